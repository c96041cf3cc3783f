"""The distillation design space (which predictions mimic the teacher, with which losses and weights) and the
papers' settings as named presets, per detector family."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

KD_METHODS = ("crosskd", "crosskd+pkd", "bckd", "none")

# The official CrossKD configs, per family (`model_type`): where the cross-head starts and the KD losses' weights.
CROSSKD_SETTINGS = {
    "gfl": {"cross_head_index": 3, "cls_kd_weight": 1.0, "loc_kd": "kl", "loc_kd_weight": 4.0},
    "retinanet": {"cross_head_index": 3, "cls_kd_weight": 1.0, "loc_kd": "iou", "loc_kd_weight": 1.0},
    "fcos": {"cross_head_index": 2, "cls_kd_weight": 0.4, "loc_kd": "log_iou", "loc_kd_weight": 0.75},
    "atss": {
        "cross_head_index": 3,
        "cls_kd_weight": 1.0,
        "loc_kd": "iou",
        "loc_kd_weight": 1.0,
        "center_kd_weight": 1.0,
    },
}
# PKD's feature loss weight in the CrossKD+PKD configs.
PKD_WEIGHT = 6.0


@dataclass
class DistillationConfig:
    """Where the distillation losses apply and how they are weighted.

    Args:
        mimic: `"cross_head"` (CrossKD: the student's tower states after `cross_head_index` convs, re-standardised to
            the teacher's statistics, ReLU, then the teacher's remaining convs and predictors) or `"student"` (the
            student's own predictions, as BCKD).
        cross_head_index: number of the student's tower convs before the cross-head (CrossKD's
            `reused_teacher_head_idx`).
        cls_kd_weight, cls_kd_beta: weight and focusing exponent of the classification KD loss
            `BCE(s, sigmoid(t)) * |sigmoid(s) - sigmoid(t)| ** beta`.
        loc_kd: `"kl"` (KL divergence of GFL's box distributions, normalised by the sum of its weights), `"iou"`
            (GIoU loss between the decoded boxes), `"log_iou"` (`-log IoU`, FCOS's) or `"none"`.
        loc_kd_weight, loc_kd_temperature: weight of the localization KD loss; temperature of `"kl"`.
        loc_kd_weighting: per-prior weight of the localization KD loss: `"teacher_score"` (the teacher's best class
            score, CrossKD's) or `"score_gap"` (the largest class-score gap between teacher and student, BCKD's).
        center_kd_weight: weight of the centre-ness KD loss on the positives (ATSS's CrossKD; 0 disables it).
        feature_kd_weight: weight of PKD feature distillation on the FPN outputs (0 disables it).
        positive_levels_only: apply the KD losses only on FPN levels with at least one positive prior in the batch
            (BCKD's original code does this).
        quality_weight_offset, quality_norm_eps: GFL's box-loss weighting; BCKD uses `w + 2e-4` and `sum(w) + 1e-6`.
    """

    mimic: str = "cross_head"
    cross_head_index: int = 3
    cls_kd_weight: float = 1.0
    cls_kd_beta: float = 1.0
    loc_kd: str = "kl"
    loc_kd_weight: float = 4.0
    loc_kd_temperature: float = 1.0
    loc_kd_weighting: str = "teacher_score"
    center_kd_weight: float = 0.0
    feature_kd_weight: float = 0.0
    positive_levels_only: bool = False
    quality_weight_offset: float = 0.0
    quality_norm_eps: float | None = None

    def __post_init__(self):
        choices = {
            "mimic": ("cross_head", "student"),
            "loc_kd": ("kl", "iou", "log_iou", "none"),
            "loc_kd_weighting": ("teacher_score", "score_gap"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")

    @property
    def detection_loss_kwargs(self) -> dict[str, float]:
        """Keyword arguments of the student's detection loss that this method changes (BCKD's GFL weighting)."""
        if self.quality_weight_offset == 0.0 and self.quality_norm_eps is None:
            return {}
        return {"quality_weight_offset": self.quality_weight_offset, "quality_norm_eps": self.quality_norm_eps}

    @classmethod
    def from_method(cls, method: str, model_type: str = "gfl", **overrides) -> DistillationConfig | None:
        """The paper settings of `method` (`crosskd`, `crosskd+pkd`, `bckd`) for detectors of `model_type`, with
        `overrides` (None values are ignored) applied; `none` (training without a teacher) gives None.

        BCKD's presets outside GFL keep its GFL losses and weights (the paper has no other family)."""
        if method not in KD_METHODS:
            raise ValueError(f"Unknown kd_method {method!r}; choose one of {KD_METHODS}.")
        if model_type not in CROSSKD_SETTINGS:
            raise ValueError(
                f"No distillation settings for {model_type!r} detectors; known: {sorted(CROSSKD_SETTINGS)}."
            )
        if method == "none":
            return None
        if method == "bckd":
            preset = cls(mimic="student", loc_kd="iou", loc_kd_weighting="score_gap", positive_levels_only=True)
            if model_type == "gfl":
                preset = replace(preset, quality_weight_offset=2e-4, quality_norm_eps=1e-6)
        else:
            preset = cls(**CROSSKD_SETTINGS[model_type])
            if method == "crosskd+pkd":
                preset = replace(preset, feature_kd_weight=PKD_WEIGHT)
        unknown = set(overrides) - {field.name for field in fields(cls)}
        if unknown:
            raise ValueError(f"Unknown distillation settings {sorted(unknown)}.")
        return replace(preset, **{key: value for key, value in overrides.items() if value is not None})


__all__ = ["CROSSKD_SETTINGS", "KD_METHODS", "DistillationConfig"]
