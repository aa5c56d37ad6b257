"""One way from a checkpoint to pixels. A newcomer's three lines:

    from sfseg.inference import load
    model = load("outputs/train/<time>/checkpoints/last.ckpt")   # device="auto", autocast=None|"bfloat16"
    result = model.predict(rgb)  # HxWx3 uint8 -> result.mask [H, W] class ids, result.level_map [H, W] (0 = coarsest)

`load` takes a checkpoint, a model folder of `python -m sfseg.export format=pretrained` or
`hf-hub:<owner>/<name>`, rebuilds the network from the model's hyperparameters (classes, palette, L,
tau) and knows the data of its training run (`model.datamodule()`). Underneath, every consumer (validation, `sfseg.eval`,
`sfseg.predict`, the notebook, the W&B pictures, `pyramid.png`, the benchmark) turns a pyramid output into
pixels with `fused_logits` (Eq. 2's fuse, then bilinear upsampling), and predicts images with the
passes here: whole image padded to the size divisor, sliding window, multi-scale + flip.

    pixels      fused_logits, level_predictions, compared_rules, rule_predictions, upsample, pad_images,
                pad_to_divisor, InputView (test scale, padding and back)
    passes      InferenceSettings, image_logits, whole_logits, slide_logits, tta_probabilities
    loading     load, Predictor, Prediction, resolve_device, autocast
    evaluation  evaluate, Evaluation, per_class_table, write_per_class_csv, write_tau_sweep,
                write_unity_calibration
    deployment  DeployedSegmenter, export_model, export_size, ExportedModel (ONNX / TorchScript files)
    sources     read_model, results_folder: what `ckpt_path` names (a .ckpt, a model folder, hf-hub:<id>)
    pretrained  export_pretrained: a model folder with safetensors weights, config and model card
"""

from sfseg.inference.deployment import (
    EXPORT_FORMATS,
    DeployedSegmenter,
    ExportedModel,
    export_model,
    export_size,
)
from sfseg.inference.evaluation import (
    Evaluation,
    evaluate,
    per_class_table,
    write_per_class_csv,
    write_tau_sweep,
    write_unity_calibration,
)
from sfseg.inference.loading import Prediction, Predictor, autocast, load, resolve_device
from sfseg.inference.passes import (
    InferenceSettings,
    image_logits,
    predict_logits,
    slide_logits,
    tta_probabilities,
    whole_logits,
    window_starts,
)
from sfseg.inference.pixels import (
    InputView,
    compared_rules,
    fused_logits,
    level_predictions,
    pad_images,
    pad_to_divisor,
    rule_predictions,
    upsample,
)
from sfseg.inference.pretrained import export_pretrained
from sfseg.inference.sources import is_hub_id, read_model, results_folder

__all__ = [
    "EXPORT_FORMATS",
    "DeployedSegmenter",
    "Evaluation",
    "ExportedModel",
    "InferenceSettings",
    "InputView",
    "Prediction",
    "Predictor",
    "autocast",
    "compared_rules",
    "evaluate",
    "export_model",
    "export_pretrained",
    "export_size",
    "fused_logits",
    "image_logits",
    "is_hub_id",
    "level_predictions",
    "load",
    "pad_images",
    "pad_to_divisor",
    "per_class_table",
    "predict_logits",
    "read_model",
    "resolve_device",
    "results_folder",
    "rule_predictions",
    "slide_logits",
    "tta_probabilities",
    "upsample",
    "whole_logits",
    "window_starts",
    "write_per_class_csv",
    "write_tau_sweep",
    "write_unity_calibration",
]
