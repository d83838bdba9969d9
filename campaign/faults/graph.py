"""Graph surgery with torch.fx: cut a traced model after a faulty layer's call, keep only what
depends on it (the *suffix*), fold eval BatchNorms into the convolutions of that suffix, and
build the golden modules that return the values a set of suffixes needs.

Why a suffix: a fault in layer L leaves everything before L unchanged, so only the part after
L must run again (docs/design.md, "Engine"). Values from before the cut that the suffix needs
(residual branches, and the input image itself where a later reshape is sized from its shape)
are *externals*: cached per image and selected per trial. A weight edited in place has an
*edit cut*: the suffix from where the values it changes first meet the images.

Every injectable layer is traced as one node, even one from outside torch.nn (timm's
``StdConv2d``), so that each has an output to cut after.
"""

from __future__ import annotations

import functools
import itertools
from collections import defaultdict
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata
from torch.nn.utils.fusion import fuse_conv_bn_eval


@dataclass(frozen=True)
class Cut:
    """A faulty layer's place in the graph: the call node, its suffix and what it needs.

    An *edit* cut (``node`` None) serves a weight edited in place: its suffix recomputes, from
    the externals alone, everything from the first nodes where what the weight changes meets
    the images (``TracedModel.edit_cut``).
    """

    node: fx.Node | None
    suffix: fx.GraphModule
    externals: tuple[fx.Node, ...]  # batch-valued values from before the cut, in suffix order


PROBE_IMAGES = 5


class TracedModel:
    """A model traced once, with the cuts and golden modules made from it so far (each made
    once: a campaign asks for the same cut shard after shard)."""

    def __init__(
        self, model: nn.Module, example: torch.Tensor, layers: Collection[nn.Module] = ()
    ) -> None:
        self.module = trace(model, layers)
        self.calls: dict[str, list[fx.Node]] = defaultdict(list)
        for node in self.module.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target].append(node)
        # Only the image input carries a batch; other inputs (timm's attn_mask=None...) are
        # constants at their defaults.
        self.image = next(n for n in self.module.graph.nodes if n.op == "placeholder")
        self.input_dependent = reachable_from([self.image])
        # Which nodes produce tensors, and which of those have one row per image: a probe of
        # PROBE_IMAGES copies of one image, a count no stack of keys and values (2) or of
        # queries, keys and values (3) shares. Swin's windows ([images x windows, ...]) are not
        # batched by image, so no suffix takes them from the cache: it recomputes them.
        probe = example[:1].expand(PROBE_IMAGES, *example.shape[1:]).clone()
        with torch.no_grad():
            ShapeProp(self.module).propagate(probe)
        self.batched = {
            n
            for n in self.input_dependent
            if _is_tensor(n) and n.meta["tensor_meta"].shape[:1] == (PROBE_IMAGES,)
        }
        self._cuts: dict[tuple[str, int], Cut] = {}
        self._edit_cuts: dict[str, Cut | None] = {}
        self._edits_from: dict[tuple[fx.Node, ...], Cut] = {}
        self._folded: dict[tuple[str, str], nn.Conv2d] = {}  # shared by every suffix
        self._golden: dict[tuple[fx.Node, ...], fx.GraphModule] = {}
        self._bytes_per_image: dict[tuple[fx.Node, ...], int] = {}

    def cut(self, layer: str, call: int) -> Cut:
        """The suffix after call ``call`` of module ``layer``."""
        key = (layer, call)
        if key not in self._cuts:
            node = self.calls[layer][call]
            suffix, externals = suffix_module(self.module, node, self.batched)
            self._cuts[key] = Cut(node, fold_batchnorm(suffix, self._folded), externals)
        return self._cuts[key]

    def edit_cut(self, layer: str, weight: torch.Tensor) -> Cut | None:
        """The edit cut of ``layer``'s ``weight``: from the first nodes where what the weight
        changes meets the images (a call of a module holding it, MultiheadAttention's for its
        ``out_proj``; a function given it, Swin's attention for its ``qkv`` weight) to the
        logits. None where no node that leads to the logits reads it."""
        if layer not in self._edit_cuts:
            output = next(n for n in self.module.graph.nodes if n.op == "output")
            starts = self._first_dependent(readers(self.module, weight))
            if output not in reachable_from(starts):
                self._edit_cuts[layer] = None
            else:  # weights that first meet the images at the same nodes share one cut
                if starts not in self._edits_from:
                    suffix, externals = suffix_module(self.module, None, self.batched, starts)
                    self._edits_from[starts] = Cut(None, suffix, externals)
                self._edit_cuts[layer] = self._edits_from[starts]
        return self._edit_cuts[layer]

    def _first_dependent(self, nodes: Sequence[fx.Node]) -> tuple[fx.Node, ...]:
        """The first image-dependent nodes at or after ``nodes``, in graph order: where values
        computed from a weight meet the images (Swin's attention call for its ``qkv``, ``proj``
        and position-bias MLP weights alike). Everything before them that the weight changes
        is a constant, recomputed in the suffix."""
        meets = self.input_dependent.__contains__
        found = {n for n in reachable_from(nodes, stop=meets) if meets(n)}
        later = set().union(*(reachable_from(list(n.users)) for n in found)) if found else set()
        return tuple(n for n in self.module.graph.nodes if n in found and n not in later)

    def golden_module(self, nodes: tuple[fx.Node, ...]) -> fx.GraphModule:
        """The model returning ``(logits, *values of nodes)``."""
        if nodes not in self._golden:
            self._golden[nodes] = golden_module(self.module, nodes)
        return self._golden[nodes]

    def bytes_per_image(self, example: torch.Tensor, nodes: tuple[fx.Node, ...]) -> int:
        """Bytes the values of ``nodes`` take for one image (measured on ``example[:1]``)."""
        if nodes not in self._bytes_per_image:
            _, *values = self.golden_module(nodes)(example[:1])
            self._bytes_per_image[nodes] = max(1, sum(v.element_size() * v.numel() for v in values))
        return self._bytes_per_image[nodes]


class _LayerTracer(fx.Tracer):
    """torch.fx's tracer, keeping ``layers`` whole as well as torch.nn's own modules."""

    def __init__(self, layers: Collection[nn.Module]) -> None:
        super().__init__()
        self.layers = {id(module) for module in layers}

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return id(module) in self.layers or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module, layers: Collection[nn.Module] = ()) -> fx.GraphModule:
    """``model`` traced with each of ``layers`` as one call node (a layer from outside torch.nn,
    such as timm's ``StdConv2d`` or ``Conv2dSame``, would otherwise be traced into, leaving no
    node whose output is the layer's). Layers that hold other layers are traced into, so those
    keep their nodes. Where keeping the layers whole breaks the trace (a layer whose tuple
    output the model unpacks), the model is traced as torch.fx does by default, and layers
    without a node of their own go through hooks (``Engine.evaluator``)."""
    ids = {id(module) for module in layers}
    whole = [
        module
        for module in layers
        if not any(id(inner) in ids for inner in module.modules() if inner is not module)
    ]
    try:
        return _trace_keeping(model, whole)
    except Exception:
        return _trace_keeping(model, ())


def _trace_keeping(model: nn.Module, layers: Collection[nn.Module]) -> fx.GraphModule:
    tracer = _LayerTracer(layers)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, model.__class__.__name__)


def reachable_from(
    starts: Sequence[fx.Node], stop: Callable[[fx.Node], bool] | None = None
) -> set[fx.Node]:
    """Every node that depends on one of ``starts`` (the starts included); with ``stop``, the
    walk goes no further than a node for which it is true (that node included)."""
    seen: set[fx.Node] = set()
    stack = list(starts)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            if stop is None or not stop(node):
                stack.extend(node.users)
    return seen


def readers(gm: fx.GraphModule, weight: torch.Tensor) -> list[fx.Node]:
    """The nodes of ``gm`` that read ``weight``: calls of modules holding it, fetches of it."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            held = gm.get_submodule(node.target)
            if any(t is weight for t in itertools.chain(held.parameters(), held.buffers())):
                found.append(node)
        elif node.op == "get_attr":
            value = functools.reduce(getattr, node.target.split("."), gm)
            if value is weight:
                found.append(node)
    return found


def suffix_module(
    gm: fx.GraphModule,
    cut: fx.Node | None,
    batched: set[fx.Node],
    starts: Sequence[fx.Node] = (),
) -> tuple[fx.GraphModule, tuple[fx.Node, ...]]:
    """A GraphModule computing the logits from ``cut``'s value and the *externals*: tensors from
    before the cut with one row per image (``batched``) that the nodes depending on ``cut`` use
    (cached per image). Everything else from before the cut is recomputed inside: constants
    (parameters, expressions of them), non-tensor values (``x.shape[0]`` and friends, which
    must follow the trial batch) and image-dependent tensors laid out otherwise (Swin's windows,
    ``[images x windows, ...]``), from the batched values they are computed from; where such a
    value comes from the image input itself (ViT's ``n, c, h, w = x.shape``), the image becomes
    an external. With ``cut`` None, the nodes ``starts`` and all that depend on them are
    recomputed, from the externals alone (an edit cut)."""
    dependent = reachable_from([cut] if cut is not None else starts)
    copied: set[fx.Node] = {n for n in dependent if n is not cut}
    externals: set[fx.Node] = set()
    stack = [arg for n in copied for arg in n.all_input_nodes]
    while stack:
        node = stack.pop()
        if node is cut or node in copied or node in externals:
            continue
        if node in batched:  # the image input itself where a recomputed value needs it
            externals.add(node)
        elif node.op == "placeholder":  # an optional input: its default (below)
            continue
        else:
            copied.add(node)
            stack.extend(node.all_input_nodes)
    ordered_externals = tuple(n for n in gm.graph.nodes if n in externals)
    graph = fx.Graph()
    env: dict[fx.Node, object] = {} if cut is None else {cut: graph.placeholder("cut")}
    for i, node in enumerate(ordered_externals):
        env[node] = graph.placeholder(f"external_{i}")
    for node in gm.graph.nodes:
        if node.op == "placeholder" and node not in env:  # optional inputs: their defaults
            env[node] = node.args[0] if node.args else None
        elif node in copied:
            if node.op == "output":
                graph.output(fx.map_arg(node.args[0], env.__getitem__))
            else:
                env[node] = graph.node_copy(node, env.__getitem__)
    graph.lint()
    return fx.GraphModule(gm, graph), ordered_externals


def fold_batchnorm(
    suffix: fx.GraphModule, folded: dict[tuple[str, str], nn.Conv2d]
) -> fx.GraphModule:
    """Fold each eval-mode BatchNorm2d into the Conv2d before it, inside the suffix only.

    The cut value itself (a placeholder) is never folded into, so fault sites stay where they
    are; folded weights change results only by rounding. New modules are added to the suffix;
    the model's own modules are not touched. ``folded`` shares each folded conv between suffixes.
    """
    modules = dict(suffix.named_modules())
    changed = False
    for node in list(suffix.graph.nodes):
        if node.op != "call_module" or not computes_as(modules.get(node.target), nn.BatchNorm2d):
            continue
        conv_node = node.args[0]
        if (
            not isinstance(conv_node, fx.Node)
            or conv_node.op != "call_module"
            or not computes_as(modules.get(conv_node.target), nn.Conv2d)
            or len(conv_node.users) != 1
            or len(node.args) != 1
            or node.kwargs
        ):
            continue
        batchnorm = modules[node.target]
        if not batchnorm.track_running_stats or batchnorm.training:
            continue
        key = (conv_node.target, node.target)
        if key not in folded:
            folded[key] = fuse_conv_bn_eval(modules[conv_node.target], batchnorm)
        name = "folded_" + conv_node.target.replace(".", "_")
        suffix.add_submodule(name, folded[key])
        conv_node.target = name
        node.replace_all_uses_with(conv_node)
        suffix.graph.erase_node(node)
        changed = True
    if changed:
        suffix.recompile()
    return suffix


def computes_as(module: nn.Module | None, base: type[nn.Module]) -> bool:
    """Whether ``module`` is a ``base`` (nn.Linear, nn.Conv2d) that computes its output as
    ``base`` does: a subclass with its own forward (timm's ``StdConv2d`` standardises its weight
    first, ``Conv2dSame`` pads inside, ``BatchNormAct2d`` adds an activation) is not, and
    neither BatchNorm folding nor the weight delta rule holds for it."""
    if not isinstance(module, base):
        return False
    methods = [name for name in ("forward", "_conv_forward") if hasattr(base, name)]
    return all(getattr(type(module), name) is getattr(base, name) for name in methods)


def cached_nodes(cuts: Iterable[tuple[Cut, bool]]) -> tuple[fx.Node, ...]:
    """The golden values the suffixes of ``cuts`` need, each once: the cut layer's output, the
    values crossing the cut, and for weight faults (the flag) the layer's input; for an edit
    cut, the values crossing it alone."""
    wanted: dict[fx.Node, None] = {}
    for cut, weight in cuts:
        if cut.node is not None:
            wanted[cut.node] = None
        wanted.update(dict.fromkeys(cut.externals))
        if cut.node is not None and weight:
            wanted[cut.node.args[0]] = None
    return tuple(wanted)


def golden_module(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> fx.GraphModule:
    """``gm`` returning ``(logits, *values of nodes)``. Each value is copied the moment it is
    computed: a later in-place op (VGG's ``ReLU(inplace=True)`` right after a Linear) would
    otherwise change the cached value behind the cache's back."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    captured: dict[fx.Node, fx.Node] = {}
    wanted = set(nodes)
    for node in gm.graph.nodes:
        if node.op == "output":
            outputs = [captured[n] for n in nodes]
            graph.output((fx.map_arg(node.args[0], env.__getitem__), *outputs))
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
            if node in wanted:
                captured[node] = graph.call_method("clone", (env[node],))
    return fx.GraphModule(gm, graph)


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("tensor_meta"), TensorMetadata)
