"""The fault-site space of any ``nn.Module``: which layers can be hit, and how many sites each has.

A *layer* is a module with a ``weight`` tensor, by default every Conv1d/2d/3d and Linear. Its
weight sites are ``weight elements x bits``; its neuron sites are ``output elements x bits`` for one
image, where the output shape comes from one probe forward with hooks.

Two traps from real models are made explicit instead of silently mishandled:
- a module whose weights its parent uses functionally (``nn.MultiheadAttention.out_proj``, Swin's
  ``qkv``/``proj``) never runs its own forward, so it has weight sites but *no* neuron sites;
  ``LayerSite.neuron_note`` says why;
- a module called more than once per forward has one output per call. Its neuron sites are
  addressed per call: a neuron index runs over the outputs of all calls, concatenated in call
  order (:meth:`LayerSite.locate_neuron`). pytorchfi mixes such calls up; we never do.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from bitstorm.errors import ConfigError
from campaign.faults.bits import format_width

CONV_LINEAR: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

TypeSelector = str | Sequence[str | type[nn.Module]]


@dataclass(frozen=True)
class LayerSite:
    """One injectable layer. Shapes exclude the batch dimension."""

    name: str
    type: str
    weight_shape: tuple[int, ...]
    output_shapes: tuple[tuple[int, ...], ...]  # one per call in the probe forward
    neuron_note: str = ""  # why the layer has no neuron sites, when it has none

    @property
    def calls(self) -> int:
        return len(self.output_shapes)

    @property
    def output_shape(self) -> tuple[int, ...] | None:
        """The output shape of a layer called exactly once; None otherwise."""
        return self.output_shapes[0] if self.calls == 1 else None

    @property
    def weight_elements(self) -> int:
        return math.prod(self.weight_shape)

    @property
    def neuron_elements(self) -> int:
        return sum(math.prod(shape) for shape in self.output_shapes)

    def weight_sites(self, fmt: str) -> int:
        return self.weight_elements * format_width(fmt)

    def neuron_sites(self, fmt: str) -> int:
        return self.neuron_elements * format_width(fmt)

    def locate_weight(self, index: int) -> tuple[int, ...]:
        """Multi-index into the weight tensor of a flat weight index."""
        _check_index(index, self.weight_elements, f"weight of {self.name}")
        return _unravel(index, self.weight_shape)

    def locate_neuron(self, index: int) -> tuple[int, tuple[int, ...]]:
        """(call, multi-index into that call's output) of a flat neuron index of one image."""
        if not self.output_shapes:
            raise ConfigError(f"layer {self.name} has no neuron sites: {self.neuron_note}")
        _check_index(index, self.neuron_elements, f"outputs of {self.name}")
        for call, shape in enumerate(self.output_shapes):
            size = math.prod(shape)
            if index < size:
                return call, _unravel(index, shape)
            index -= size
        raise AssertionError("unreachable: index was bounds-checked")


@dataclass(frozen=True)
class SiteSpace:
    """Every selected layer of a model, in module order, with totals per number format."""

    layers: tuple[LayerSite, ...]
    input_shape: tuple[int, ...]

    def __getitem__(self, name: str) -> LayerSite:
        for layer in self.layers:
            if layer.name == name:
                return layer
        close = fnmatch.filter(self.names(), f"*{name.rsplit('.', 1)[-1]}*")[:5]
        hint = f"; similar: {', '.join(close)}" if close else ""
        raise ConfigError(f"no injectable layer named {name!r}{hint}")

    def __iter__(self) -> Iterator[LayerSite]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def weight_sites(self, fmt: str) -> int:
        return sum(layer.weight_sites(fmt) for layer in self.layers)

    def neuron_sites(self, fmt: str) -> int:
        return sum(layer.neuron_sites(fmt) for layer in self.layers)

    def table(self, fmt: str = "fp32") -> str:
        """A plain-text table of the space, for CLIs and logs."""
        rows = [
            (
                "layer",
                "type",
                "weight",
                "output",
                "calls",
                f"weight sites ({fmt})",
                f"neuron sites ({fmt})",
            )
        ]
        for layer in self.layers:
            output = (
                "x".join(map(str, layer.output_shape))
                if layer.output_shape
                else (f"{layer.calls} calls" if layer.calls else "none")
            )
            rows.append(
                (
                    layer.name,
                    layer.type,
                    "x".join(map(str, layer.weight_shape)),
                    output,
                    str(layer.calls),
                    f"{layer.weight_sites(fmt):,}",
                    f"{layer.neuron_sites(fmt):,}",
                )
            )
        rows.append(
            ("total", "", "", "", "", f"{self.weight_sites(fmt):,}", f"{self.neuron_sites(fmt):,}")
        )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
        )


def find_sites(
    model: nn.Module,
    example: torch.Tensor | Sequence[int],
    *,
    types: TypeSelector = "conv_linear",
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
) -> SiteSpace:
    """List the injectable layers of ``model`` and probe their output shapes with one forward.

    ``example`` is one input batch or the shape of one image (``(3, 32, 32)``). ``types`` is
    ``"conv_linear"`` (default), ``"weighted"`` (any module with a weight tensor), or a list of
    module classes or class names (a name matches subclasses too, e.g. ``"Linear"``).
    ``include``/``exclude`` are globs on qualified module names (``"layer4.*"``).
    """
    selected = select_layers(model, types=types, include=include, exclude=exclude)
    inputs = _example_batch(model, example)
    calls: dict[str, list[tuple[int, ...]]] = {name: [] for name in selected}
    non_tensor: set[str] = set()
    unbatched: set[str] = set()

    def record(name: str, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            non_tensor.add(name)
        elif output.shape[:1] != inputs.shape[:1]:
            unbatched.add(name)
        else:
            calls[name].append(tuple(output.shape[1:]))

    with hooked_outputs(selected, record), torch.no_grad(), eval_mode(model):
        model(inputs)

    layers = []
    for name, module in selected.items():
        if name in non_tensor:
            note, shapes = "its output is not a single tensor", ()
        elif name in unbatched:
            note, shapes = (
                "its output has no image dimension (its first dimension is not one row per "
                "image: a table every image shares, as Swin-V2's position bias, or the windows "
                "of several images stacked, as in timm's Swin and MaxViT): weight faults only",
                (),
            )
        elif not calls[name]:
            note, shapes = (
                (
                    "its forward never runs: the parent uses its weights functionally "
                    "(weight faults only)"
                ),
                (),
            )
        else:
            note, shapes = "", tuple(calls[name])
        layers.append(
            LayerSite(
                name=name,
                type=type(module).__name__,
                weight_shape=tuple(module.weight.shape),
                output_shapes=shapes,
                neuron_note=note,
            )
        )
    return SiteSpace(layers=tuple(layers), input_shape=tuple(inputs.shape[1:]))


def select_layers(
    model: nn.Module,
    *,
    types: TypeSelector = "conv_linear",
    include: Sequence[str] = ("*",),
    exclude: Sequence[str] = (),
) -> dict[str, nn.Module]:
    """Qualified name -> module for every layer the selection admits, in module order."""
    is_type = _type_predicate(types)
    selected = {
        name: module
        for name, module in model.named_modules()
        if name
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and is_type(module)
        and any(fnmatch.fnmatchcase(name, pattern) for pattern in include)
        and not any(fnmatch.fnmatchcase(name, pattern) for pattern in exclude)
    }
    if not selected:
        present = sorted(
            {
                type(m).__name__
                for _, m in model.named_modules()
                if isinstance(getattr(m, "weight", None), torch.Tensor)
            }
        )
        raise ConfigError(
            f"no layer matches types={types!r}, include={list(include)}, exclude={list(exclude)}; "
            f"module types with weights in this model: {', '.join(present) or 'none'}"
        )
    return selected


def activation_peaks(
    model: nn.Module, images: torch.Tensor, names: Sequence[str], batch_size: int | None = None
) -> dict[str, float]:
    """max |output| of each named layer over ``images`` (all calls), ``batch_size`` images per
    forward: the profile that int8 neuron scales and the paper preset's clamp are derived
    from. Images go to the model's device chunk by chunk."""
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        raise ConfigError(f"unknown layer(s) {unknown}; list them with find_sites(model, ...)")
    peaks = dict.fromkeys(names, 0.0)

    def record(name: str, output: object) -> None:
        if isinstance(output, torch.Tensor):
            peaks[name] = max(peaks[name], float(output.detach().abs().amax()))

    device = next(iter(model.parameters()), images).device
    with hooked_outputs({n: modules[n] for n in names}, record), torch.no_grad(), eval_mode(model):
        for chunk in images.split(batch_size or len(images)):
            model(chunk.to(device))
    return peaks


@contextmanager
def hooked_outputs(
    modules: dict[str, nn.Module], record: Callable[[str, object], None]
) -> Iterator[None]:
    """Call ``record(name, output)`` on every forward call of the given modules, then unhook."""
    handles = [
        module.register_forward_hook(lambda _m, _i, out, name=name: record(name, out))
        for name, module in modules.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, restoring each submodule's own training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _type_predicate(types: TypeSelector) -> Callable[[nn.Module], bool]:
    if types == "conv_linear":
        return lambda module: isinstance(module, CONV_LINEAR)
    if types == "weighted":
        return lambda module: True
    if isinstance(types, str):
        raise ConfigError(
            f"types={types!r}: pass 'conv_linear', 'weighted', or a list of module classes/names"
        )
    classes = tuple(t for t in types if isinstance(t, type))
    names = {t for t in types if isinstance(t, str)}
    return lambda module: (
        isinstance(module, classes) or any(cls.__name__ in names for cls in type(module).__mro__)
    )


def _example_batch(model: nn.Module, example: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """A probe batch of at least two images: with one, an output that has no image dimension
    (a table every image shares, such as Swin-V2's position bias) would look batched by its
    leading 1."""
    if isinstance(example, torch.Tensor):
        return example.expand(2, *example.shape[1:]) if len(example) == 1 else example
    reference = next(iter(model.parameters()), None)
    batch = torch.randn((2, *example), generator=torch.Generator().manual_seed(0))
    if reference is None:
        return batch
    return batch.to(device=reference.device, dtype=reference.dtype)


def _check_index(index: int, size: int, what: str) -> None:
    if not 0 <= index < size:
        raise ConfigError(f"index {index} is outside the {size:,} elements of the {what}")


def _unravel(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    coords = []
    for size in reversed(shape):
        index, coord = divmod(index, size)
        coords.append(coord)
    return tuple(reversed(coords))
