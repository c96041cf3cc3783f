"""Distill, train or evaluate a dense detector: `hf-kd-train` (see `hf_kd/cli/train.py` or `--help`).

accelerate launch examples/run_distill.py --teacher_model_name_or_path T --kd_method crosskd --data_dir COCO ...
"""

from hf_kd.cli.train import main

if __name__ == "__main__":
    main()
