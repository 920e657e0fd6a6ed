"""MomentumNet: any stack of residual functions as a momentum network that backpropagates
without storing activations.

Forward rule, for residual functions f_1 ... f_L and momentum gamma::

    v <- gamma v + (1 - gamma) f_k(x)
    x <- x + v

With ``memory="reversible"`` the forward keeps only the final state; the backward walks the
layers in reverse, recovering each input from the output, recomputing f once, and applying the
fused backward step. In float arithmetic the recovery loses bits at every layer (the error is
multiplied by 1 / gamma per layer), so ``exact=True`` (the default) runs the state in int64 fixed
point and keeps the bits that the multiplication by gamma drops in a buffer that grows with depth
(log2(1 / gamma) bits per layer and element, about 0.15 at gamma = 0.9). Recovery is then bit
for bit at any depth, and the gradients are those of plain backpropagation through the same
forward.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable
from fractions import Fraction

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from deepkern.ops import momentum as ops

__all__ = ["MomentumNet", "NondeterministicResidualError"]


class NondeterministicResidualError(RuntimeError):
    """A residual function gave different values when recomputed in the backward pass."""


# ---------------------------------------------------------------------------------------------
# Replaying a residual function exactly: random state, buffers, deterministic algorithms.


def _rng_devices(x: Tensor) -> list[int]:
    return [x.device.index or 0] if x.is_cuda else []


def _rng_state(devices: list[int]):
    cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
    return torch.get_rng_state(), cuda_states


def _rng_changed(before, after) -> bool:
    if not torch.equal(before[0], after[0]):
        return True
    return any(not torch.equal(a, b) for a, b in zip(before[1], after[1]))


@contextlib.contextmanager
def _replay_rng(state, devices: list[int]):
    """Run the body with the random state a layer saw in the forward pass, then restore ours."""
    if state is None:
        yield
        return
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        for device, cuda_state in zip(devices, state[1]):
            torch.cuda.set_rng_state(cuda_state, device)
        yield


@contextlib.contextmanager
def _frozen_buffers(module: nn.Module):
    """Recompute without touching buffers: BatchNorm statistics move once per forward only."""
    buffers = list(module.buffers())
    saved = [b.detach().clone() for b in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, saved):
                buffer.copy_(value)


@contextlib.contextmanager
def _deterministic(enabled: bool):
    """Ask PyTorch for deterministic algorithms, so that f gives the same bits twice."""
    if not enabled:
        yield
        return
    previous = torch.are_deterministic_algorithms_enabled()
    previous_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    previous_cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous, warn_only=previous_warn)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous_cudnn


def _apply(function: nn.Module, index: int, x: Tensor) -> Tensor:
    out = function(x)
    if not isinstance(out, Tensor) or out.shape != x.shape:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"residual function {index} ({type(function).__name__}) must return a tensor shaped "
            f"like its input {tuple(x.shape)}, got {shape}"
        )
    return out


class _Config:
    """What the autograd function needs besides tensors."""

    def __init__(self, functions, gamma, exact_gamma, frac_bits, deterministic):
        self.functions = functions
        self.gamma = gamma
        self.exact_gamma = exact_gamma
        self.frac_bits = frac_bits
        self.deterministic = deterministic
        # Parameters per layer (layers may share a module; autograd adds up their gradients).
        self.layer_params = [[p for p in f.parameters() if p.requires_grad] for f in functions]


# ---------------------------------------------------------------------------------------------
# Inference: the same arithmetic as training, nothing recorded.


def _forward_float(cfg: _Config, x: Tensor, v: Tensor):
    for k, function in enumerate(cfg.functions):
        x, v = ops.forward(x, v, _apply(function, k, x).to(x.dtype), cfg.gamma)
    return x, v


def _first_bad_layer(statuses: list[Tensor]) -> int | None:
    errors = torch.stack([s[1] for s in statuses]) if statuses else None
    if errors is None or int(errors.sum()) == 0:
        return None
    return int(torch.nonzero(errors)[0, 0])


def _forward_exact(cfg: _Config, x: Tensor, v: Tensor):
    gamma, bits = cfg.exact_gamma, cfg.frac_bits
    fixed_x = ops.to_fixed(x, bits, "x")
    fixed_v = ops.to_fixed(v, bits, "v (the initial velocity)")
    buffer = torch.zeros((1, x.numel()), dtype=torch.int32, device=x.device)
    statuses = []
    for k, function in enumerate(cfg.functions):
        fx = _apply(function, k, ops.from_fixed(fixed_x, bits, x.dtype))
        limbs = ops.buffer_limbs(gamma, k + 1)
        fixed_x, fixed_v, buffer, status = ops.exact_forward(
            fixed_x, fixed_v, fx, buffer, gamma, bits, limbs
        )
        statuses.append(status)

    _raise_if_out_of_range(statuses, bits)
    return fixed_x, fixed_v, buffer


# ---------------------------------------------------------------------------------------------
# The reversible backward: one autograd node per layer, sharing the state through a chain.
#
# Each layer is its own node, so autograd accumulates a layer's parameter gradients as soon as
# that layer is done (and DDP can start reducing them), instead of holding a second copy of
# every parameter gradient until the whole stack is done. No node saves activations: the last
# one keeps the final state, and each backward recovers the state below it and leaves it in the
# chain for the next node down.


class _Chain:
    """What the per-layer nodes of one forward pass share."""

    def __init__(self, cfg: _Config, exact: bool, x: Tensor):
        self.cfg, self.exact = cfg, exact
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.devices = _rng_devices(x)
        # Forward: the state after the layers run so far. Backward: the state after the layer
        # being undone. Float mode (x, v); exact mode (fixed_x, fixed_v, buffer).
        self.state: tuple = ()
        self.rng_states: list = []
        self.statuses: list[Tensor] = []
        self.checksums: Tensor | None = None


def _reversible(cfg: _Config, exact: bool, x: Tensor, v: Tensor):
    chain = _Chain(cfg, exact, x)
    with torch.no_grad():
        if exact:
            buffer = torch.zeros((1, x.numel()), dtype=torch.int32, device=x.device)
            chain.state = (
                ops.to_fixed(x, cfg.frac_bits, "x"),
                ops.to_fixed(v, cfg.frac_bits, "v (the initial velocity)"),
                buffer,
            )
        else:
            chain.state = (x.detach(), v.detach())
    for k in range(len(cfg.functions)):
        x, v = _Layer.apply(chain, k, x, v, *cfg.layer_params[k])
    return x, v


class _Layer(torch.autograd.Function):
    @staticmethod
    def forward(ctx, chain: _Chain, k: int, x: Tensor, v: Tensor, *params: Tensor):
        ctx.chain, ctx.k = chain, k
        cfg = chain.cfg
        last = k == len(cfg.functions) - 1
        function = cfg.functions[k]
        with torch.no_grad(), _deterministic(cfg.deterministic):
            if chain.exact:
                fixed_x, fixed_v, buffer = chain.state
                # Past the first layer, x is the previous node's float view of fixed_x.
                layer_input = x if k else ops.from_fixed(fixed_x, cfg.frac_bits, chain.dtype)
            else:
                layer_input = chain.state[0]
            before = _rng_state(chain.devices)
            fx = _apply(function, k, layer_input)
            changed = _rng_changed(before, _rng_state(chain.devices))
            chain.rng_states.append(before if changed else None)

            if chain.exact:
                limbs = ops.buffer_limbs(cfg.exact_gamma, k + 1)
                fixed_x, fixed_v, buffer, status = ops.exact_forward(
                    fixed_x, fixed_v, fx, buffer, cfg.exact_gamma, cfg.frac_bits, limbs
                )
                chain.statuses.append(status)
                chain.state = (fixed_x, fixed_v, buffer)
                x_out = ops.from_fixed(fixed_x, cfg.frac_bits, chain.dtype)
                # Below the last layer the velocity output only links the nodes; its values
                # are never read, so it is not converted.
                v_out = (
                    ops.from_fixed(fixed_v, cfg.frac_bits, chain.dtype)
                    if last
                    else torch.empty_like(x_out)
                )
            else:
                x_out, v_out = ops.forward(*chain.state, fx.to(chain.dtype), cfg.gamma)
                chain.state = (x_out, v_out)

        if last:
            if chain.exact:
                _raise_if_out_of_range(chain.statuses, cfg.frac_bits)
                chain.checksums = torch.stack([s[0] for s in chain.statuses])
                chain.statuses = []
            ctx.save_for_backward(*chain.state)
        return x_out, v_out

    @staticmethod
    @once_differentiable  # the recomputation is not itself recorded: no double backward
    def backward(ctx, grad_x: Tensor | None, grad_v: Tensor | None):
        chain, k = ctx.chain, ctx.k
        cfg = chain.cfg
        function = cfg.functions[k]
        if k == len(cfg.functions) - 1:  # the first node of every backward pass
            chain.state = tuple(ctx.saved_tensors)
        if grad_x is None:
            grad_x = torch.zeros(chain.shape, dtype=chain.dtype, device=chain.device)
        grad_v = torch.zeros_like(grad_x) if grad_v is None else grad_v
        grad_x, grad_v = grad_x.contiguous(), grad_v.contiguous()

        # Buffers come back after the layer's gradients are taken: autograd may have saved
        # them (BatchNorm saves its running statistics).
        with _frozen_buffers(function):
            # Recover this layer's input and recompute f on it, as the forward saw it.
            if chain.exact:
                fixed_x, fixed_v, buffer = chain.state
                layer_input = ops.from_fixed(fixed_x - fixed_v, cfg.frac_bits, chain.dtype)
            else:
                x, v = chain.state
                layer_input = x - v
            layer_input = layer_input.detach().requires_grad_(True)
            with (
                torch.enable_grad(),
                _deterministic(cfg.deterministic),
                _replay_rng(chain.rng_states[k], chain.devices),
            ):
                fx = _apply(function, k, layer_input)

            # Step the state back; in exact mode, refuse to go on from a state that differs
            # from the forward's.
            if chain.exact:
                limbs = ops.buffer_limbs(cfg.exact_gamma, k)
                fixed_x, fixed_v, buffer, status = ops.exact_inverse(
                    fixed_x, fixed_v, fx.detach(), buffer, cfg.exact_gamma, cfg.frac_bits, limbs
                )
                _check_replay(k, status, chain.checksums[k])
                chain.state = (fixed_x, fixed_v, buffer)
            else:
                chain.state = ops.inverse(x, v, fx.detach().to(chain.dtype), cfg.gamma)

            # Pull the gradients through the layer.
            cotangent = (1 - cfg.gamma) * (grad_x + grad_v)
            inputs = [layer_input] + cfg.layer_params[k]
            grads = torch.autograd.grad(
                fx, inputs, cotangent.to(fx.dtype), allow_unused=True, materialize_grads=True
            )
        grad_x, grad_v = ops.backward(grad_x, grad_v, grads[0].to(chain.dtype), cfg.gamma)
        return (None, None, grad_x, grad_v, *grads[1:])


def _raise_if_out_of_range(statuses: list[Tensor], bits: int) -> None:
    """One synchronisation for the whole stack: any element out of range fails the call."""
    bad = _first_bad_layer(statuses)
    if bad is not None:
        raise ValueError(
            f"exact mode: residual function {bad} returned non-finite values, or the state left "
            f"the fixed-point range (|x|, |v| < 2^{ops.STATE_BITS - bits} with {bits} fractional "
            "bits; fewer fractional bits widen it)"
        )


def _check_replay(k: int, status: Tensor, checksum: Tensor) -> None:
    """Refuse to return gradients computed from a state that differs from the forward's.

    One host synchronisation per layer, so that the error comes before this layer's gradients
    reach any parameter.
    """
    if bool((status[0] != checksum) | (status[1] != 0)):
        raise NondeterministicResidualError(
            f"exact reversible backward: recomputing residual function {k} did not reproduce "
            "the forward pass; the function is not deterministic (random layers without a "
            "seed, nondeterministic kernels, or state that changes between calls), so its "
            "gradients are not returned (those of the layers above it may already be "
            "accumulated)"
        )


# ---------------------------------------------------------------------------------------------
# The module.


class MomentumNet(nn.Module):
    """A stack of residual functions run as a momentum network.

    Args:
        functions (iterable of nn.Module): the residual functions f_1 ... f_L; each maps a
            tensor to one of the same shape.
        gamma (float in (0, 1]): momentum. 0.9 is the usual choice.
        init_speed (float): the initial velocity, v_0 = init_speed everywhere.
        memory ("reversible" or "backprop"): "reversible" stores no activations and recomputes
            each f once in the backward pass; "backprop" is plain autograd.
        exact (bool): with reversible memory, run the state in fixed point so that the
            backward recovers every activation bit for bit (default). With False, recovery is
            in floating point and its error grows by 1 / gamma per layer.
        frac_bits (int): fractional bits of the fixed-point state in exact mode. The state
            must stay below 2^(52 - frac_bits) in magnitude: 2^20 with the default 32.

    Shapes:
        forward(x: Tensor[*]) -> Tensor[*], floating point. ``return_velocity=True`` returns
        (x, v).

    Raises:
        ValueError: gamma outside (0, 1], an unknown memory mode, a residual function that
            changes the shape of its input, non-finite values in exact mode.
        NondeterministicResidualError: in exact mode, when recomputing f in the backward pass
            gives different values than the forward did.

    Notes:
        Recomputation leaves the functions' buffers as the forward left them (BatchNorm running
        statistics move once per forward) and replays the random state of layers that drew
        random numbers (dropout). Exact mode rounds gamma to a fraction with denominator at
        most 65536 and synchronises with the device once per forward and once per backward
        to check for errors. Parameters must be registered on the functions to get gradients.

    Example:
        >>> blocks = [nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(64)]
        >>> net = MomentumNet(blocks, gamma=0.9)
        >>> net(torch.randn(8, 16)).sum().backward()
    """

    def __init__(
        self,
        functions: Iterable[nn.Module],
        gamma: float = 0.9,
        init_speed: float = 0.0,
        memory: str = "reversible",
        exact: bool = True,
        frac_bits: int = ops.DEFAULT_FRAC_BITS,
    ):
        super().__init__()
        self.functions = nn.ModuleList(functions)
        if memory not in ("reversible", "backprop"):
            raise ValueError(f"memory must be 'reversible' or 'backprop', got {memory!r}")
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and 0 < gamma <= 1):
            raise ValueError(f"gamma must be a number in (0, 1], got {gamma!r}")
        if not isinstance(frac_bits, int) or not 8 <= frac_bits <= 52:
            raise ValueError(f"frac_bits must be an integer in [8, 52], got {frac_bits!r}")
        if not math.isfinite(init_speed):
            raise ValueError(f"init_speed must be finite, got {init_speed!r}")
        self.gamma = float(gamma)
        self.init_speed = float(init_speed)
        self.memory = memory
        self.exact = bool(exact)
        self.frac_bits = frac_bits
        uses_exact = self.exact and memory == "reversible"
        self._exact_gamma: Fraction | None = ops.exact_gamma(self.gamma) if uses_exact else None
        if uses_exact and float(self._exact_gamma) != self.gamma:
            warnings.warn(
                f"exact mode uses gamma = {self._exact_gamma} = {float(self._exact_gamma)!r} "
                f"in place of {self.gamma!r}",
                stacklevel=2,
            )

    def extra_repr(self) -> str:
        return (
            f"depth={len(self.functions)}, gamma={self.gamma}, memory={self.memory!r}, "
            f"exact={self.exact}"
        )

    def forward(self, x: Tensor, v: Tensor | None = None, return_velocity: bool = False):
        if not x.is_floating_point():
            raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
        if v is None:
            v = torch.full_like(x, self.init_speed)
        elif v.shape != x.shape or v.dtype != x.dtype or v.device != x.device:
            raise ValueError(
                f"v must match x in shape, dtype and device: x is {tuple(x.shape)} {x.dtype} "
                f"on {x.device}, v is {tuple(v.shape)} {v.dtype} on {v.device}"
            )

        if self.memory == "backprop":
            x_out, v_out = self._forward_backprop(x, v)
        else:
            x_out, v_out = self._forward_reversible(x, v)
        return (x_out, v_out) if return_velocity else x_out

    def _gamma_for_arithmetic(self) -> float:
        exact = self.exact and self.memory == "reversible"
        return float(self._exact_gamma) if exact else self.gamma

    def _config(self) -> _Config:
        # gamma may have been changed since construction; exact mode follows it.
        uses_exact = self.exact and self.memory == "reversible"
        if uses_exact and (self._exact_gamma is None or float(self._exact_gamma) != self.gamma):
            self._exact_gamma = ops.exact_gamma(self.gamma)
        return _Config(
            self.functions,
            self._gamma_for_arithmetic(),
            self._exact_gamma,
            self.frac_bits,
            deterministic=self.exact,
        )

    def _forward_backprop(self, x: Tensor, v: Tensor):
        for k, function in enumerate(self.functions):
            x, v = ops.forward(x, v, _apply(function, k, x).to(x.dtype), self.gamma)
        return x, v

    def _forward_reversible(self, x: Tensor, v: Tensor):
        cfg = self._config()
        needs_grad = torch.is_grad_enabled() and (
            x.requires_grad or v.requires_grad or any(cfg.layer_params)
        )
        if needs_grad and len(self.functions):
            return _reversible(cfg, self.exact, x, v)

        # Inference: the same arithmetic, nothing saved.
        if self.exact:
            fixed_x, fixed_v, _ = _forward_exact(cfg, x, v)
            return (
                ops.from_fixed(fixed_x, self.frac_bits, x.dtype),
                ops.from_fixed(fixed_v, self.frac_bits, x.dtype),
            )
        return _forward_float(cfg, x, v)
