"""branch_dtype_4bit: decoder layers that take their branch dtype from a linear layer's ``.weight.dtype``.

transformers 5.25's ergo decoder layer starts its forward with ``branch_dtype = self.self_attn.o_proj.weight.dtype``
and casts the normed hidden states to it before attention and before the MLP. Under ``load_in_4bit`` o_proj is a
bitsandbytes ``Linear4bit``, whose weight holds packed bytes: ``.weight.dtype`` is ``torch.uint8`` (the quant
storage), the hidden states are cast to uint8 and the first matmul fails (``expected m1 and m2 to have the same
dtype``), with or without the other shims.

What the read means is "the dtype this branch runs in", the dtype o_proj's weight has in the float model. A 4-bit
weight keeps it in its QuantState (``quant_state.dtype``, the dtype it was quantized from). The patch gives such a
forward that dtype: the layer's own forward, compiled again from its source with each ``self.<path>.weight.dtype``
read replaced by :func:`weight_dtype`'s rule for ``self.<path>.weight`` (a float weight: its dtype, unchanged; a packed 4-bit one:
the dtype it was quantized from). Nothing else in the forward changes, and line numbers stay upstream's. The class's
forward is replaced by the recompiled one wrapped as transformers wraps it (GradientCheckpointingLayer).
Needed where a declared decoder layer's forward reads ``.weight.dtype`` through ``self`` (read from its source).
"""

from __future__ import annotations

import ast
import copy
import inspect
import logging
import textwrap
import types

from ..registry import DriftError, Patch, Target, chain_undo, present_holders, swap_attr

log = logging.getLogger("shims")

_LAYERS = (("transformers.models.ergo.modeling_ergo", "ErgoDecoderLayer"),)
TARGETS = tuple(Target(module, f"{cls}.forward") for module, cls in _LAYERS)


def weight_dtype(module):
    """The float dtype of ``module``'s weight: the dtype a packed 4-bit weight was quantized from, else its dtype."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and not weight.is_floating_point():
        return state.dtype
    return weight.dtype


def _self_path(node) -> bool:
    """True for ``self`` or ``self.a.b...`` (attribute reads only)."""
    while isinstance(node, ast.Attribute):
        node = node.value
    return isinstance(node, ast.Name) and node.id == "self"


def _is_weight_dtype_read(node) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "dtype" and isinstance(node.value, ast.Attribute)
            and node.value.attr == "weight" and _self_path(node.value.value) and isinstance(node.ctx, ast.Load))


# weight_dtype's rule as an expression of the weight W, inlined where the forward read W.dtype: builtins only, so the
# recompiled code needs no new name in upstream's module
_RULE = ast.parse("(W.quant_state.dtype if getattr(W, 'quant_state', None) is not None and not W.is_floating_point() "
                  "else W.dtype)", mode="eval").body


class _PutWeight(ast.NodeTransformer):
    def __init__(self, weight):
        self.weight = weight

    def visit_Name(self, node):
        return copy.deepcopy(self.weight) if node.id == "W" else node


class _ReadsToRule(ast.NodeTransformer):
    def visit_Attribute(self, node):
        if _is_weight_dtype_read(node):
            return ast.copy_location(_PutWeight(node.value).visit(copy.deepcopy(_RULE)), node)
        return self.generic_visit(node)


def _parsed(fn):
    """(module AST of ``fn``'s source, its def node) or None when the source cannot be read or is not a plain def."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0] if tree.body else None
    if not isinstance(node, ast.FunctionDef) or node.decorator_list or fn.__code__.co_freevars:
        return None  # decorators or closures would not survive a recompile: not ours to rewrite
    return tree, node


def reads_weight_dtype(fn) -> bool:
    parsed = _parsed(fn)
    return parsed is not None and any(_is_weight_dtype_read(n) for n in ast.walk(parsed[1]))


def _recompiled_code(fn):
    """The code of ``fn`` compiled again from its own source, each weight-dtype read replaced by
    :func:`weight_dtype`'s rule inlined (``_RULE``)."""
    tree, _ = _parsed(fn)
    tree = ast.fix_missing_locations(_ReadsToRule().visit(tree))
    ast.increment_lineno(tree, fn.__code__.co_firstlineno - 1)  # tracebacks point at upstream's lines
    namespace: dict = {}
    exec(compile(tree, fn.__code__.co_filename, "exec"), fn.__globals__, namespace)  # noqa: S102 (upstream's own def)
    return namespace[fn.__name__].__code__


def _layer_forward(cls):
    """The forward ``cls`` defines, under the wrappers around it (transformers' GradientCheckpointingLayer wraps
    every subclass's forward, and checks that the wrapper is still the class's forward: it must stay)."""
    return inspect.unwrap(cls.forward)


def _affected() -> list:
    return [cls for _, cls in present_holders(TARGETS) if reads_weight_dtype(_layer_forward(cls))]


def _needed() -> str | None:
    if not _affected():
        return "no declared decoder layer reads a linear layer's .weight.dtype in its forward"
    return None


def _rebuilt(fn):
    """A new function: ``fn``'s recompiled code with ``fn``'s globals, defaults, name and docs."""
    new = types.FunctionType(_recompiled_code(fn), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    new.__kwdefaults__, new.__qualname__, new.__doc__ = fn.__kwdefaults__, fn.__qualname__, fn.__doc__
    new.__module__ = fn.__module__
    return new


def _as_class_forward(cls, fn):
    """``fn`` wrapped as transformers wraps a layer's own forward when its class is defined (GradientCheckpointingLayer
    wraps it in ``__init_subclass__``, and checkpoints only while that wrapper is the class's forward): by letting it
    wrap ``fn`` in a throwaway subclass. Refused when the wrapping does not come out as deep as the class's."""
    if inspect.unwrap(cls.forward) is cls.forward:
        return fn
    shell = type(cls.__name__, (cls,), {"forward": fn, "__module__": __name__})
    wrapped = vars(shell)["forward"]
    if inspect.unwrap(wrapped) is not fn or _depth(wrapped) != _depth(cls.forward):
        raise DriftError(f"{cls.__qualname__}.forward is wrapped by something other than its class definition")
    return wrapped


def _depth(fn) -> int:
    depth = 0
    while hasattr(fn, "__wrapped__"):
        fn, depth = fn.__wrapped__, depth + 1
    return depth


def _install():
    undos = []
    for cls in _affected():
        undos.append(swap_attr(cls, "forward", _as_class_forward(cls, _rebuilt(_layer_forward(cls)))))
        log.debug("shims: %s.forward reads 4-bit weights' float dtype", cls.__name__)
    return chain_undo(undos)


PATCHES = (
    Patch(
        name="branch_dtype_4bit",
        summary="decoder layers that cast hidden states to a linear layer's .weight.dtype (ergo: o_proj) read the "
                "dtype a 4-bit weight was quantized from, not its uint8 storage",
        targets=(),
        # Optional: only transformers with such a layer (ergo, 5.25) have them; needed() says so.
        optional_targets=TARGETS,
        needed=_needed,
        install=_install,
    ),
)
