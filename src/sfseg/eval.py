"""Evaluation entry point: `python -m sfseg.eval ckpt_path=<ckpt> data=<name> [eval.*]` (Hydra).

The model, its L, tau and classes come from the checkpoint (`sfseg.inference.load`: a .ckpt, a model
folder of `sfseg.export format=pretrained` or `hf-hub:<owner>/<name>`). Predictions are
whole-image or sliding-window (`eval.mode=slide`), optionally multi-scale + flip (`eval.scales`,
`eval.flip`), from the fused output or the finest level only (`eval.fuse=false`, Table 8's "auxiliary
supervision"). A single-scale whole-image pass of the fused pyramid also feeds the specialization
analysis (Sec. 5.5), the fuse's headroom (metrics.json["headroom"]: each level alone, the best single
level, the oracle fuse, the pixels the fuse missed, every training-free fuse rule on the same pyramids;
docs/fuse.md) and the unity pyramid's reliability diagrams; `eval.tau` overrides the checkpoint's tau,
and `eval.tau_sweep=[...]` re-fuses that pass's pyramids at each tau (the tau trade-off). The fuse rule
is the checkpoint's (model.fuse.name). The eval folder (default `<training run>/eval`, see
`default_eval_folder`) gets metrics.json, per_class.csv, specialization.json, table9.png, fig3.png,
unity_calibration.json and .png, and with a sweep tau_sweep.csv, .md and .png.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sfseg.cli import hydra_main, short_errors
from sfseg.inference import (
    InferenceSettings,
    Predictor,
    autocast,
    evaluate,
    load,
    per_class_table,
    resolve_device,
    results_folder,
    write_per_class_csv,
    write_tau_sweep,
    write_unity_calibration,
)
from sfseg.pyramid import check_tau
from sfseg.runs import write_json
from sfseg.visualize import fig3_figure, save_figure, table9_figure

OUTPUT_FILES = ("metrics.json", "per_class.csv", "specialization.json", "table9.png", "fig3.png")


def default_eval_folder(
    ckpt_path: str, mode: str, scales: Sequence[float], flip: bool, fuse: bool, tau: float | None = None
) -> str:
    """`<training run folder>/eval` plus a suffix per non-default setting (_slide, _ms, _flip,
    _finest, _tau<tau>), so that e.g. Table 8's fused and finest-only results sit side by side; for a
    model folder or a hub id, its `results_folder` instead of the run folder."""
    folder = results_folder(ckpt_path)  # a missing checkpoint fails here, before Hydra makes the folder
    name = "eval"
    name += "_slide" if mode == "slide" else ""
    name += "_ms" if [float(scale) for scale in scales] != [1.0] else ""
    name += "_flip" if flip else ""
    name += "" if fuse else "_finest"
    name += "" if tau is None else f"_tau{tau:g}"
    return str(folder / name)


# conf/eval.yaml's hydra.run.dir calls it; registered at import, before Hydra composes the config.
OmegaConf.register_new_resolver("sfseg_eval_folder", short_errors()(default_eval_folder), replace=True)
# conf/eval.yaml's default data: the checkpoint's training run's (Predictor.training_data). The node is
# open (not struct), so that data.<key>=<value> sets any key of that recorded config, data.root above all.
CHECKPOINT_DATA = "checkpoint"
ConfigStore.instance().store(
    group="data", name=CHECKPOINT_DATA, node=OmegaConf.create({}, flags={"struct": False})
)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate `cfg.ckpt_path` on `cfg.data`'s val split; write and return the metrics."""
    out_dir = Path(HydraConfig.get().runtime.output_dir)
    predictor, settings = load_predictor(cfg)
    checkpoint_tau = predictor.tau
    taus = set_taus(cfg, predictor)
    if HydraConfig.get().runtime.choices.get("data") == CHECKPOINT_DATA:
        cfg.data = predictor.training_data(cfg.data)
    datamodule = predictor.datamodule(cfg)
    datamodule.setup("validate")
    evaluation = evaluate(
        predictor,
        datamodule.val_dataloader(),
        settings,
        tau_sweep=taus,
        calibration_bins=cfg.eval.calibration_bins,
    )

    scores = evaluation.scores()
    metrics = {
        **scores,
        "checkpoint": str(predictor.checkpoint.resolve()),
        "data": cfg.data._target_,
        "inference": {
            **asdict(settings),
            "device": str(predictor.device),
            "autocast": predictor.autocast,
            "tau": predictor.tau,
            "checkpoint_tau": checkpoint_tau,
            "fuse_rule": predictor.fuse_rule.label,
        },
        "headroom": evaluation.headroom(),
    }
    specialization = evaluation.specialization()
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics)
    write_per_class_csv(out_dir / "per_class.csv", scores, evaluation.per_class_headroom())
    write_json(out_dir / "specialization.json", specialization)
    save_figure(table9_figure(specialization), out_dir / "table9.png")
    save_figure(fig3_figure(specialization), out_dir / "fig3.png")
    written = [out_dir / name for name in OUTPUT_FILES]
    written += write_unity_calibration(out_dir, evaluation)
    if taus:
        written += write_tau_sweep(out_dir, evaluation, checkpoint_tau)

    print("\n" + per_class_table(scores))
    print(
        f"\n{evaluation.num_images} images, {settings.describe()}, {predictor.fuse_rule.label} fuse, tau={predictor.tau:g}"
    )
    print(headroom_line(metrics["headroom"], predictor.levels))
    if taus:
        print("\n" + (out_dir / "tau_sweep.md").read_text())
    for path in written:
        print(f"  {path}")
    return metrics


def load_predictor(cfg: DictConfig) -> tuple[Predictor, InferenceSettings]:
    """The checkpoint's predictor and the `eval` settings, with sparse inference off when the model's
    fuse rule needs every level at every cell (the predictor says so in one line)."""
    settings = InferenceSettings.from_config(cfg.eval)
    device = resolve_device(cfg.eval.device)
    autocast(device, cfg.eval.autocast)  # validates the key before the long part
    predictor = load(
        cfg.ckpt_path, device=device, autocast=cfg.eval.autocast, sparse_inference=settings.sparse
    )
    return predictor, replace(settings, sparse=predictor.sparse_inference)


def set_taus(cfg: DictConfig, predictor: Predictor) -> list[float]:
    """Set eval.tau on the predictor and return the taus of eval.tau_sweep (see `sweep_taus`); a fuse
    rule that does not read tau says so."""
    checkpoint_tau = predictor.tau
    if cfg.eval.tau is not None:
        predictor.tau = check_tau(cfg.eval.tau, "eval.tau")
    taus = sweep_taus(cfg.eval.tau_sweep, checkpoint_tau)
    if (taus or cfg.eval.tau is not None) and not predictor.fuse_rule.reads_tau:
        print(
            f"note: the {predictor.fuse_rule.label} fuse does not read tau; eval.tau and eval.tau_sweep leave "
            "it as is"
        )
    return taus


def headroom_line(headroom: dict[str, Any], levels: int) -> str:
    """One line: the single-scale fused mIoU beside each level alone, the best level, the oracle fuse and
    every compared rule (percent)."""
    parts = [f"fused {100 * headroom['mIoU']:.2f}"]
    parts += [f"level {level} {100 * headroom[f'mIoU_level{level}']:.2f}" for level in range(1, levels + 1)]
    parts += [f"best level ({headroom['best_level']}) {100 * headroom['mIoU_best_level']:.2f}"]
    parts += [f"oracle {100 * headroom['mIoU_oracle']:.2f}"]
    parts += [
        f"{key.removeprefix('mIoU_fuse_')} {100 * value:.2f}"
        for key, value in headroom.items()
        if key.startswith("mIoU_fuse_")
    ]
    return "single-scale mIoU (%): " + ", ".join(parts)


def sweep_taus(tau_sweep: Sequence[float], checkpoint_tau: float) -> list[float]:
    """eval.tau_sweep's taus and the checkpoint's own (to mark it), sorted; [] for no sweep."""
    if not OmegaConf.is_list(tau_sweep) and not isinstance(tau_sweep, list | tuple):
        raise ValueError(f"eval.tau_sweep must be a list of taus, e.g. [0.5,0.7,0.9], got {tau_sweep!r}")
    if not tau_sweep:
        return []
    return sorted({*(check_tau(tau, "eval.tau_sweep") for tau in tau_sweep), checkpoint_tau})


@hydra_main("eval")
def main(cfg: DictConfig) -> float:
    return run(cfg)["mIoU"]


if __name__ == "__main__":
    main()
