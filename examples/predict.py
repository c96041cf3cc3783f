"""Run a saved object detector on images: `hf-kd-predict` (see `hf_kd/cli/predict.py` or `--help`)."""

from hf_kd.cli.predict import main

if __name__ == "__main__":
    main()
