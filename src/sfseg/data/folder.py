"""`data=folder`: any folder of image/label pairs, by configuration only (conf/data/folder.yaml).

The keys describe where the files are and what their label values mean; `folder_layout` turns them into
a `Layout`, so that scanning, pairing, the raw-value lookup, `sfseg.data.validate` and
`sfseg.data.browse` are those of the paper's datasets:

- `data.image_dir`, `data.label_dir`: path templates under `data.root` with `{split}`;
- `data.image_suffix`, `data.label_suffix`: image and label pair by the stem left after the suffix;
- `data.list_file` (optional): a template of a file listing the ids (stems) of a split, one per line;
- `data.classes`: class names, and optionally palette and raw ids (`sfseg.data.classes.read_classes`);
- `data.label_format`: `ids` (8- or 16-bit single-channel PNGs of raw values; class k is raw `ids[k]`,
  or k, or k + 1 with `data.reduce_zero_label`) or `colors` (RGB PNGs in the palette's colours);
- `data.reduce_zero_label`: raw 0 -> ignore, k -> class k - 1 (and 255 ignored), as mmsegmentation does;
- `data.ignore_values`: raw values (ids) or [r, g, b] colours (colors) that mean "don't care".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sfseg.data.classes import ClassTable, colour_triple, generated_palette, raw_value, read_classes
from sfseg.data.datasets import Layout
from sfseg.data.real import FileDataModule

LABEL_FORMATS = ("ids", "colors")
# mmsegmentation's reduce_zero_label: 0 -> 255, k -> k - 1, and 255 stays ignored.
REDUCED_IGNORE_RAW = (0, 255)


class FolderDataModule(FileDataModule):
    """A dataset of the user's own: the layout comes from the config, not from the class."""

    def __init__(
        self,
        root: str,
        classes: Any,
        image_dir: str = "images/{split}",
        label_dir: str = "annotations/{split}",
        image_suffix: str = ".jpg",
        label_suffix: str = ".png",
        list_file: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        label_format: str = "ids",
        reduce_zero_label: bool = False,
        ignore_values: Sequence[Any] = (),
        **kwargs: Any,
    ) -> None:
        self.layout = folder_layout(
            read_classes(classes, root),
            image_dir=image_dir,
            label_dir=label_dir,
            image_suffix=image_suffix,
            label_suffix=label_suffix,
            list_file=list_file,
            splits=(train_split, val_split),
            label_format=label_format,
            reduce_zero_label=reduce_zero_label,
            ignore_values=ignore_values,
        )
        super().__init__(root=root, train_split=train_split, val_split=val_split, **kwargs)
        templates = [template for template in (image_dir, label_dir, list_file) if template is not None]
        if (
            self.subsample is None
            and train_split != val_split
            and all(t.format(split=train_split) == t.format(split=val_split) for t in templates)
        ):
            raise ValueError(
                f"data.train_split={train_split} and data.val_split={val_split} would read the same files: "
                "put {split} into data.image_dir and data.label_dir, or give a data.list_file with {split}"
            )


def folder_layout(
    classes: ClassTable,
    *,
    image_dir: str,
    label_dir: str,
    image_suffix: str,
    label_suffix: str,
    list_file: str | None,
    splits: tuple[str, str],
    label_format: str,
    reduce_zero_label: bool,
    ignore_values: Sequence[Any],
) -> Layout:
    """The Layout the data=folder keys describe; an inconsistent key is a ValueError that names it."""
    if label_format not in LABEL_FORMATS:
        raise ValueError(f"data.label_format={label_format!r} is not one of {', '.join(LABEL_FORMATS)}")
    for key, template in (("data.image_dir", image_dir), ("data.label_dir", label_dir)):
        check_template(template, key)
    if list_file is not None:
        check_template(list_file, "data.list_file")
    for key, suffix in (("data.image_suffix", image_suffix), ("data.label_suffix", label_suffix)):
        if not isinstance(suffix, str) or not suffix:
            raise ValueError(f"{key} must be the end of the file names, e.g. .jpg or _gt.png; got {suffix!r}")
    if label_format == "ids":
        mapping = raw_id_mapping(classes, reduce_zero_label, ignore_values)
    else:
        mapping = colour_mapping(classes, reduce_zero_label, ignore_values)
    return Layout(
        name="folder",
        classes=classes.names,
        splits=splits,
        image_dir=image_dir,
        label_dir=label_dir,
        list_file=list_file,
        image_suffix=image_suffix,
        label_suffix=label_suffix,
        tree=folder_tree(image_dir, label_dir, image_suffix, label_suffix, list_file, label_format),
        raw_values_hint=f" (classes: {classes.source}; ignored: data.ignore_values)",
        **mapping,
    )


def check_template(template: Any, key: str) -> None:
    try:
        template.format(split="train")
    except (AttributeError, KeyError, IndexError, ValueError) as error:
        raise ValueError(
            f"{key}={template!r} is not a path template: it may hold {{split}} and no other {{...}} ({error!r})"
        ) from error


def raw_id_mapping(classes: ClassTable, reduce_zero_label: bool, ignore_values: Sequence[Any]) -> dict:
    """label_format=ids: class k is raw ids[k] (the classes file's), or k, or k + 1 (reduce_zero_label)."""
    if classes.ids is not None and reduce_zero_label:
        raise ValueError(
            f"data.reduce_zero_label=true and {classes.source} gives ids: use one of the two "
            "(reduce_zero_label means raw 0 is ignored and class k is raw k + 1)"
        )
    first = 1 if reduce_zero_label else 0
    raw_ids = classes.ids or tuple(range(first, first + len(classes.names)))
    ignored = {
        raw_value(value, "data.ignore_values (raw values, as data.label_format=ids)")
        for value in ignore_values
    }
    if reduce_zero_label:
        ignored |= {raw for raw in REDUCED_IGNORE_RAW if raw not in raw_ids}
    clash = sorted(ignored & set(raw_ids))
    if clash:
        raise ValueError(f"data.ignore_values {clash} are raw ids of classes of {classes.source}")
    return {
        "palette": classes.palette or generated_palette(len(classes.names)),
        "raw_to_class": {raw: class_id for class_id, raw in enumerate(raw_ids)},
        "ignore_raw": tuple(sorted(ignored)),
    }


def colour_mapping(classes: ClassTable, reduce_zero_label: bool, ignore_values: Sequence[Any]) -> dict:
    """label_format=colors: class k is the palette's colour k; the ignored colours follow it."""
    if classes.palette is None:
        raise ValueError(
            f"data.label_format=colors needs each class's colour, and {classes.source} has no palette: give "
            "data.classes as a YAML or JSON file with classes: [names] and palette: [[r, g, b], ...]"
        )
    if classes.ids is not None:
        raise ValueError(f"{classes.source} gives ids, which only data.label_format=ids reads")
    if reduce_zero_label:
        raise ValueError(
            "data.reduce_zero_label applies to data.label_format=ids; with colors, list the colour that "
            "means 'don't care' in data.ignore_values"
        )
    palette = classes.palette
    repeated = sorted({colour for colour in palette if palette.count(colour) > 1})
    if repeated:
        raise ValueError(
            f"{classes.source}: the palette repeats colours {repeated}, so labels would be ambiguous"
        )
    ignored = []
    for value in ignore_values:
        colour = colour_triple(value, "data.ignore_values ([r, g, b] colours, as data.label_format=colors)")
        if colour in palette:
            raise ValueError(
                f"data.ignore_values: {colour} is the colour of class {classes.names[palette.index(colour)]!r}"
            )
        if colour not in ignored:
            ignored.append(colour)
    return {
        "palette": palette,
        "raw_to_class": {class_id: class_id for class_id in range(len(palette))},
        "ignore_raw": tuple(range(len(palette), len(palette) + len(ignored))),
        "label_colours": (*palette, *ignored),
    }


def folder_tree(
    image_dir: str,
    label_dir: str,
    image_suffix: str,
    label_suffix: str,
    list_file: str | None,
    label_format: str,
) -> str:
    """The expected layout, each part with the key that sets it."""
    labels = "raw ids, single-channel" if label_format == "ids" else "RGB, the palette's colours"
    lines = [
        "<data.root>",
        f"├── {image_dir}/<id>{image_suffix}  <- data.image_dir, data.image_suffix",
        f"└── {label_dir}/<id>{label_suffix}  <- data.label_dir, data.label_suffix ({labels}: "
        f"data.label_format={label_format})",
    ]
    if list_file is None:
        lines.append("(no data.list_file: a split is every image with a label of the same <id>)")
    else:
        lines[-1] = "├" + lines[-1][1:]
        lines.append(f"└── {list_file}  <- data.list_file: the <id>s of a split, one per line")
    return "\n".join(lines)
