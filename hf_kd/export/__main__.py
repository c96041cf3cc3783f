"""`python -m hf_kd.export MODEL_DIR OUT.onnx`: see [`hf_kd.export`]."""

from .exporter import main

if __name__ == "__main__":
    raise SystemExit(main())
