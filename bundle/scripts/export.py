"""Export the classifier face of :class:`~scripts.network.SDLNet` as ONNX and as a ``torch.export`` program.

``SDLNet.forward`` maps ``image`` ``[B, 3, H, W]`` float32 to ``pred`` ``[B, C]`` probabilities (the mean of the
branches' softmax). One ``torch.export.export`` trace of it, with a dynamic batch axis (``torch.export.Dim``) and
the training image size fixed, gives both artefacts:

* ``--pt2 FILE.pt2``: the ``ExportedProgram``, saved with ``torch.export.save``; ``torch.export.load`` reads it
  in a process that has no ``scripts`` package, and ``program.module()(image)`` gives the probabilities.
* ``--onnx FILE.onnx``: the same program converted by ``torch.onnx.export`` (dynamo exporter, needs ``onnx`` and
  ``onnxscript``; ``pip install -e ".[export]"``), input ``image`` ``[batch, 3, H, W]``, output ``pred``
  ``[batch, C]``.

Both carry the bundle's metadata and configs as MONAI's TorchScript archive does: ``metadata.json`` (the parsed
``_meta_``) and ``<config name>.json`` for each config file, plus ``overrides.json`` when the command line
overrode config values, and ``model_settings.json``: the settings the model was trained with
(:mod:`scripts.model_settings`, read from beside the checkpoint by ``inference.yaml``); in the ONNX model as
``metadata_props``, in the ``.pt2`` archive as extra files
(``torch.export.load(f, extra_files={"metadata.json": ""})`` fills them in).

From the repository root (after ``pip install -e ".[export]"``)::

    python -m scripts.export --onnx sdl_glioma.onnx --pt2 sdl_glioma.pt2 --ckpt_file bundle/models/model.pt \
        --meta_file bundle/configs/metadata.json --config_file bundle/configs/inference.yaml

The arguments mirror ``python -m monai.bundle ckpt_export``: ``net_id`` (default ``network_def``),
``--key_in_ckpt`` for a nested checkpoint, and any other ``--id value`` overrides the config (e.g.
``--image_size 64 --hidden_size 32``). The input size is the config's ``image_size`` (the size the model was
trained at; a network with folded pooling refuses any other), else the metadata's ``spatial_shape``;
``--input_shape "[1,3,H,W]"`` sets it explicitly (its batch entry is ignored: the batch axis is dynamic).
The checkpoint must fit the network exactly (``load_state_dict(strict=True)``); a checkpoint of another
architecture stops the command with a message and writes no file. After writing, both files are read back and
compared with the eager network on random images (``--verify false`` skips that; the ONNX check needs
``onnxruntime``).

The TorchScript archive of ``python -m monai.bundle ckpt_export`` stays the artefact MONAI Deploy 4.0 reads;
these two are for ONNX Runtime serving and for ``torch.export`` users (AOTInductor, ExecuTorch).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scripts.flags import as_flag

__all__ = ["ExportError", "INPUT_NAME", "OUTPUT_NAME", "export", "export_program", "load_network", "save_onnx"]

logger = logging.getLogger(__name__)

INPUT_NAME, OUTPUT_NAME = "image", "pred"  # the names in metadata.json's network_data_format
EXAMPLE_BATCH = 2  # torch.export specialises a dimension whose example size is 0 or 1, so trace with 2
VERIFY_BATCH, VERIFY_ATOL = 3, 1e-4


class ExportError(ValueError):
    """The export cannot be made as asked (wrong checkpoint, no output file, ...): reported without a traceback."""


def _read_checkpoint(ckpt_file: str | os.PathLike, key_in_ckpt: str = "") -> dict[str, torch.Tensor]:
    state = torch.load(ckpt_file, map_location="cpu", weights_only=True)
    if key_in_ckpt:
        if not isinstance(state, dict) or key_in_ckpt not in state:
            raise ExportError(f"{ckpt_file} has no key {key_in_ckpt!r} (--key_in_ckpt)")
        state = state[key_in_ckpt]
    if not isinstance(state, dict):
        raise ExportError(f"{ckpt_file} holds a {type(state).__name__}, not a state_dict")
    return state


def load_network(
    ckpt_file: str | os.PathLike,
    config_file: str | Sequence[str],
    meta_file: str | Sequence[str] | None = None,
    net_id: str = "network_def",
    key_in_ckpt: str = "",
    **override: Any,
) -> tuple[nn.Module, Any]:
    """``net_id`` of the config (with ``override`` applied) in eval mode with the checkpoint's weights, and the
    ``ConfigParser`` it came from. Raises :class:`ExportError` when the checkpoint does not fit the network."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(f=config_file)
    if meta_file is not None:
        parser.read_meta(f=meta_file)
    if "ckpt_path" in parser and "ckpt_path" not in override:
        parser["ckpt_path"] = str(ckpt_file)  # inference.yaml reads the model's settings from beside this file
    for key, value in override.items():
        parser[key] = value
    net = parser.get_parsed_content(net_id)
    if not isinstance(net, nn.Module):
        raise ExportError(f"`{net_id}` of {config_file} is a {type(net).__name__}, not a torch.nn.Module")
    state = _read_checkpoint(ckpt_file, key_in_ckpt)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ExportError(
            f"the checkpoint {ckpt_file} does not fit `{net_id}` of {config_file} (another architecture, or settings "
            f"that differ from the ones it was trained with, e.g. backbone, hidden_size, image_size, num_classes): "
            f"{error}"
        ) from None
    return net.eval(), parser


def input_shape_of(parser: Any, input_shape: Sequence[int] | None = None) -> tuple[int, int, int]:
    """``(C, H, W)`` of one image: ``input_shape`` (its batch entry dropped), else the config's ``image_size``
    with the metadata's channel count, else the metadata's ``spatial_shape``."""
    if input_shape:
        shape = [int(s) for s in input_shape]
        if len(shape) != 4:
            raise ExportError(f"--input_shape must be [N, C, H, W], got {input_shape!r}")
        return shape[1], shape[2], shape[3]
    image_meta = parser.get("_meta_", {}).get("network_data_format", {}).get("inputs", {}).get(INPUT_NAME, {})
    channels = int(image_meta.get("num_channels", 3))
    if "image_size" in parser:
        size = int(parser.get_parsed_content("image_size"))
        return channels, size, size
    spatial = image_meta.get("spatial_shape")
    if not spatial or len(spatial) != 2:
        raise ExportError("no image_size in the config and no 2-d spatial_shape in the metadata: pass --input_shape")
    return channels, int(spatial[0]), int(spatial[1])


def export_program(net: nn.Module, image_shape: Sequence[int]) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``net.forward`` on ``[batch, *image_shape]`` images, batch dynamic (>= 1)."""
    example = torch.rand(EXAMPLE_BATCH, *image_shape)
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        return torch.export.export(net.eval(), (example,), dynamic_shapes=({0: batch},))


def save_onnx(program: torch.export.ExportedProgram, filepath: str | os.PathLike, extra: dict[str, str]) -> None:
    """Convert ``program`` to ONNX (input ``image``, output ``pred``, batch axis ``batch``) and save it with
    ``extra`` as ``metadata_props``. Weights over 2 GB go to an external data file beside it."""
    example = program.example_inputs[0]
    onnx_program = torch.onnx.export(
        program,
        example,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes=({0: "batch"},),  # names the program's batch symbol in the ONNX graph
        dynamo=True,
        verbose=False,
    )
    onnx_program.model.metadata_props.update(extra)
    onnx_program.save(str(filepath))


def _extra_files(parser: Any, config_file: str | Sequence[str], override: dict[str, Any]) -> dict[str, str]:
    """metadata.json and one ``<stem>.json`` per config file (as ``monai.bundle ckpt_export`` embeds them)."""
    from monai.bundle import ConfigParser

    extra = {"metadata.json": json.dumps(parser.get("_meta_", {}))}
    for path in [config_file] if isinstance(config_file, (str, os.PathLike)) else config_file:
        name = Path(path).stem + ".json"
        if name in extra:
            raise ExportError(f"two config files are named {Path(path).stem!r}; their embedded copies would collide")
        extra[name] = json.dumps(ConfigParser.load_config_file(path))
    if override:
        extra["overrides.json"] = json.dumps(override, default=str)
    return extra


def _verify(net: nn.Module, image_shape: Sequence[int], onnx_path: Path | None, pt2_path: Path | None) -> None:
    """Read the written files back and compare their probabilities with the eager network's."""
    x = torch.rand(VERIFY_BATCH, *image_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = net(x)
    outputs: dict[Path, torch.Tensor] = {}
    if pt2_path is not None:
        with torch.no_grad():
            outputs[pt2_path] = torch.export.load(pt2_path).module()(x)
    if onnx_path is not None:
        try:
            import onnxruntime
        except ImportError:
            logger.warning("onnxruntime is not installed: %s is not verified (pip install -e '.[export]')", onnx_path)
        else:
            session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
            outputs[onnx_path] = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0])
    for path, got in outputs.items():
        error = (got - expected).abs().max().item()
        if got.shape != expected.shape or error > VERIFY_ATOL:
            shape = tuple(got.shape)
            raise ExportError(f"{path} differs from the eager network (max |diff| {error:.2e}, shape {shape})")
        logger.info("verified %s: batch %d, max |diff| to eager %.1e", path, VERIFY_BATCH, error)


def export(
    ckpt_file: str,
    config_file: str | Sequence[str],
    meta_file: str | Sequence[str] | None = None,
    onnx: str | None = None,
    pt2: str | None = None,
    net_id: str = "network_def",
    key_in_ckpt: str = "",
    input_shape: Sequence[int] | None = None,
    verify: bool | str = True,
    **override: Any,
) -> None:
    """Write the ONNX model (``onnx``) and/or the ``torch.export`` program (``pt2``) of ``net_id``'s classifier
    face with the weights of ``ckpt_file`` (see the module doc). Nothing is written unless the network loads and
    exports; a file that fails verification is removed."""
    if not onnx and not pt2:
        raise ExportError("nothing to write: give --onnx FILE.onnx and/or --pt2 FILE.pt2")
    if onnx:
        try:
            import onnx as _onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as error:
            raise ExportError(
                f"the ONNX export needs onnx and onnxscript ({error}): pip install -e '.[export]'"
            ) from None
    net, parser = load_network(ckpt_file, config_file, meta_file, net_id, key_in_ckpt, **override)
    image_shape = input_shape_of(parser, input_shape)
    extra = _extra_files(parser, config_file, override)
    if getattr(net, "model_settings", ""):  # the trained settings the network was built with (scripts.model_settings)
        extra["model_settings.json"] = net.model_settings
    try:
        program = export_program(net, image_shape)
    except ValueError as error:  # e.g. scripts.pool_fold.MapSizeCheck: an image size the fold was not made for
        shape = ", ".join(map(str, image_shape))
        raise ExportError(f"`{net_id}` does not run on [batch, {shape}] images: {error}") from None
    logger.info("traced `%s` with torch.export: input [batch, %d, %d, %d]", net_id, *image_shape)
    written: list[Path] = []
    try:
        if pt2:
            written.append(Path(pt2))
            torch.export.save(program, pt2, extra_files=extra)
            logger.info("exported to file: %s", pt2)
        if onnx:
            written.append(Path(onnx))
            save_onnx(program, onnx, extra)
            logger.info("exported to file: %s", onnx)
        if as_flag(verify):
            _verify(net, image_shape, Path(onnx) if onnx else None, Path(pt2) if pt2 else None)
    except BaseException:
        for path in written:
            for leftover in (path, path.with_name(path.name + ".data")):
                leftover.unlink(missing_ok=True)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    import fire

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s - %(levelname)s - %(message)s")
    logger.setLevel(logging.INFO)  # this command's steps, not the ONNX optimizer's per-pass notes
    try:
        fire.Fire(export, command=list(sys.argv[1:] if argv is None else argv))
    except ExportError as error:
        print(f"export failed: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
