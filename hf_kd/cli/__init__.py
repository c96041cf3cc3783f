"""hf_kd's command-line tools (installed as console scripts): `hf-kd-train` and `hf-kd-eval` (`train`),
`hf-kd-predict` (`predict`), `hf-kd-convert` (`hf_kd.convert.mmdet`)."""
