"""Per-client sample-level DP-SGD with Opacus, and its accounting (docs/methods.md §4; choice P4, docs/oracles.md).

Each client clips every per-example gradient — one flat norm over *all* its trainable tensors — to ``C``, adds
``N(0, σ²C²)`` to the sum and divides by the expected batch size.  Batches are Poisson samples with rate
``q = batch_size / n_k``.  One Opacus RDP accountant per client is stepped once per local step; the ε it has spent
at ``δ`` is reported every round.  The server adds no noise.

Calibration: with a target ε, σ is found by Opacus' ``get_noise_multiplier`` for the whole run, assuming the client
takes part in *every* round (conservative when ``clients.fraction < 1``).  Configs whose budget cannot be met are
refused by :func:`plan_privacy` before any model loads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache


from fedlora.errors import PrivacyBudgetError


@dataclass(frozen=True)
class ClientPrivacy:
    """The DP-SGD parameters of one client for the whole run."""

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    clip: float
    delta: float


def _rdp_accountant():
    """Opacus' RDP accountant, imported on first use: Opacus (and the SciPy it pulls in, ~110 MB resident) is
    loaded only by runs that account for differential privacy."""
    from opacus.accountants import RDPAccountant

    return RDPAccountant()


def projected_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """ε after ``steps`` Poisson-subsampled Gaussian steps, by the RDP accountant."""
    acc = _rdp_accountant()
    acc.load_state_dict({"history": [(noise_multiplier, sample_rate, steps)], "mechanism": acc.mechanism()})
    return acc.get_epsilon(delta)


@lru_cache(maxsize=4096)
def calibrate_noise(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """σ meeting (ε, δ) after ``steps`` steps at rate q (Opacus' search), or ValueError when no σ can.

    The RDP bound has a floor set by the accountant's range of orders: past σ ≈ 100 more noise barely lowers ε.  We
    test that floor first (Opacus itself needs ~30 s to give up) and cache by arguments, since clients of equal size
    share them.
    """
    if projected_epsilon(100.0, sample_rate, steps, delta) > epsilon:
        floor = projected_epsilon(1e6, sample_rate, steps, delta)
        if floor > epsilon:
            raise ValueError(f"the smallest epsilon any noise multiplier reaches here is {floor:.3f}")
    from opacus.accountants.utils import get_noise_multiplier

    return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate,
                                      steps=steps, accountant="rdp"))


def plan_privacy(dp_cfg, client_sizes: dict[int, int], steps_per_round: dict[int, int], rounds: int,
                 batch_size: int) -> dict[int, ClientPrivacy]:
    """σ and q per client, or :class:`PrivacyBudgetError` naming the client and what would be needed."""
    plans = {}
    for cid, n in client_sizes.items():
        q = batch_size / n
        if q >= 1.0:
            raise PrivacyBudgetError(
                f"client {cid} has {n} training examples, not more than train.batch_size = {batch_size}: Poisson "
                f"sampling needs batch_size < n (sample rate q = {q:.2f}); lower the batch size or use fewer clients")
        if dp_cfg.delta >= 1.0 / n:
            raise PrivacyBudgetError(
                f"dp.delta = {dp_cfg.delta} is not below 1/n = {1.0 / n:.2e} for client {cid} ({n} examples); "
                f"such a delta permits leaking whole examples — use a smaller delta")
        steps = rounds * steps_per_round[cid]
        if dp_cfg.noise_multiplier > 0:
            sigma = dp_cfg.noise_multiplier
            if dp_cfg.epsilon > 0 and math.isfinite(dp_cfg.epsilon):
                eps = projected_epsilon(sigma, q, steps, dp_cfg.delta)
                if eps > dp_cfg.epsilon:
                    raise PrivacyBudgetError(
                        f"client {cid}: dp.noise_multiplier = {sigma} over {steps} steps at q = {q:.4f} spends "
                        f"epsilon = {eps:.2f} > dp.epsilon = {dp_cfg.epsilon}; raise the noise, or lower rounds / "
                        f"local steps / batch size")
        else:
            try:
                sigma = calibrate_noise(float(dp_cfg.epsilon), float(dp_cfg.delta), q, steps)
            except ValueError as exc:
                raise PrivacyBudgetError(
                    f"client {cid}: no noise multiplier reaches epsilon = {dp_cfg.epsilon} at delta = "
                    f"{dp_cfg.delta} over {steps} steps with q = {q:.4f} ({exc})") from None
        plans[cid] = ClientPrivacy(float(sigma), q, steps_per_round[cid], dp_cfg.clip, dp_cfg.delta)
    return plans


class ClientAccountant:
    """An RDP accountant per client with a compact, checkpointable history."""

    def __init__(self) -> None:
        self._acc: dict = {}  # client id → opacus RDPAccountant

    def step(self, client_id: int, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        acc = self._acc.get(client_id)
        if acc is None:
            acc = self._acc[client_id] = _rdp_accountant()
        for _ in range(steps):
            acc.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)

    def epsilon(self, client_id: int, delta: float) -> float:
        acc = self._acc.get(client_id)
        if acc is None or not acc.history:
            return 0.0
        return float(acc.get_epsilon(delta))

    def state_dict(self) -> dict[int, list[tuple[float, float, int]]]:
        """Per client, the history of its Opacus accountant's own ``state_dict`` (the checkpoint's JSON form)."""
        return {cid: list(acc.state_dict()["history"]) for cid, acc in self._acc.items()}

    def load_state_dict(self, state: dict[int, list[tuple[float, float, int]]]) -> None:
        """Inverse of :meth:`state_dict`, through Opacus' ``load_state_dict``."""
        self._acc = {}
        for cid, history in state.items():
            acc = _rdp_accountant()
            acc.load_state_dict({"history": [tuple(h) for h in history], "mechanism": acc.mechanism()})
            self._acc[int(cid)] = acc
