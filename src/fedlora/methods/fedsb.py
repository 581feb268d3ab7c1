"""Fed-SB (Singhal, Ponkshe et al., "Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance in
(Private) Federated LoRA Fine-Tuning", arXiv 2502.15436): LoRA-SB's fixed factors, a trained ``r × r`` core.

Every LoRA module computes ``ΔW = s·B·R·A`` (LoRA-SB, Ponkshe et al., arXiv 2411.19557).  A and B are fitted once,
before round 1, and never change; clients train only R (and the head).  Since B and A are shared, averaging R is
exact: ``Σ_k p_k·s·B R_k A = s·B (Σ_k p_k R_k) A``, and the upload is ``r²`` numbers per module, whatever the
model's width.

**Initialisation** (LoRA-SB's "update approximation"): the first step of full fine-tuning with Adam is approximately
``ΔW₁ = −η′·sign(G)``, ``G = Σ_i ∂ℓ_i/∂W`` over a sample of examples at the pretrained weights; its best rank-r
approximation ``U_r Σ_r V_rᵀ`` gives ``B = U_r``, ``A = V_rᵀ`` (orthonormal, frozen) and ``R = Σ_r / s``, so that the
starting model is ``W₀ + trunc_r(ΔW₁)`` (the model is already moved by the approximated first step; it is not
``W₀``).

Our choices, against the authors' code (CERT-Lab/fed-sb; ``utils/gradient_utils.py``,
``utils/initialization_utils.py``, ``fed/fed_agg.py``, ``DP/SNLI/fed_trainer.py``):

* **Whose data fits the initialisation**: the server's.  The code computes G in the simulation process on the first
  550 rows of the pooled training set (all of them client 0's shard in its SNLI script).  Here the server draws
  ``fedsb.init_examples`` (default 550) rows, seeded, from the union of the clients' training rows
  (:mod:`fedlora.engine.weight_gradients`): a server holding a small in-distribution sample.  That sample is outside
  the clients' DP accounting — the code privatises only the local training and says nothing of it — so Fed-SB
  refuses DP-SGD unless ``fedsb.unaccounted_init = true`` says the server may use those rows openly.
* **η′** = ``train.lr / (rounds × local steps)`` by default (with ``train.local_epochs`` it must be set); the SNLI
  script divides lr by the local epochs times the batches of the *whole pooled* training set, the multi-round CR
  script by the steps of one round and the warm-up ratio.  η′ only scales R's starting value, not B and A.
* **G is the plain sum** of per-example gradients.  The code divides each batch's mean loss by the batch size again,
  so a short last batch weighs more (550 = 17·32 + 6 rows: its 6 rows count ~5× each); sign() removes a common
  scale, not unequal weights.
* **R = Σ_r / s**: the code sets R = Σ_r with alpha = r (s = 1) in every Fed-SB script; dividing by s gives the same
  starting model for any ``lora.alpha``, but R's steps are still scaled by s: ``lora.alpha = lora.rank`` trains as
  the code does (at alpha = 2r, a learning rate x acts like the code's 2x).
* **The SVD** is exact (LAPACK, float64); the code uses a randomised ``svd_lowrank`` (10 iterations) cast to bf16.
* **Averaging** is data-weighted, ``p_k = n_k / Σ n``; the code's uniform mean is the same for its equal shards.
  The head is averaged with R, as in the code.  The code's multi-round scripts never clear the list of client
  R's, so round t averages every R since round 1; we average the round's uploads (the paper's rule).
* **Traffic**: B and A go to each client once, with its first plan, and the client keeps them (``ClientPlan.keep``);
  later plans carry R and the head only.  A client that lost what it kept (a restarted Flower node) would train R
  on the wrong factors: its upload is left out of the average and it receives B and A again next time.
* The ``r × r`` core is a layer PEFT lacks (:class:`fedlora.lora.CoreLinear`); the exported adapter folds it into B
  (``B ← B·R``, exact), a plain LoRA adapter any PEFT user loads.  Heterogeneous ranks are not supported (neither
  the paper nor the code has them): every client trains at the smallest configured rank.
"""
from __future__ import annotations

import torch

from fedlora.adapters import ROLE_A, ROLE_B, ROLE_R, Adapter, LoraModule
from fedlora.methods.base import ClientPlan, Method, MethodConfig, ServerState, Update, register


def lora_sb_factors(gradient: torch.Tensor, rank: int, step: float, scale: float
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, R)`` of LoRA-SB's initialisation from a summed weight gradient ``G (d_out × d_in)``: the rank-r SVD
    ``U Σ Vᵀ`` of ``−step·sign(G)`` gives ``B = U_r``, ``A = V_rᵀ``, ``R = Σ_r / scale`` (float64 throughout)."""
    update = -step * torch.sign(gradient.double())
    U, S, Vh = torch.linalg.svd(update, full_matrices=False)
    return Vh[:rank].contiguous(), U[:, :rank].contiguous(), torch.diag(S[:rank]) / scale


@register
class FedSB(Method):
    name = "fedsb"
    summary = ("Fed-SB: LoRA-SB's B and A fitted once to the approximated first full-fine-tuning step and frozen; "
               "clients train and send only an r x r matrix R between them, whose average is exact.")
    citation = ("Singhal, Ponkshe et al., Fed-SB: A Silver Bullet for Extreme Communication Efficiency and "
                "Performance in (Private) Federated LoRA Fine-Tuning, arXiv 2502.15436 (2025)")
    lora_core = True
    accepts_server_optimizer = True
    scores_layers_by_gradient = True  # the initialisation needs gradients through the head: keep its random init
    config_sections = ("fedsb",)

    @classmethod
    def method_config(cls, cfg) -> MethodConfig:
        """Its own section, with ``init_lr = 0`` resolved to ``train.lr / (rounds × local steps)``."""
        import dataclasses

        config = super().method_config(cfg)
        section = config.sections["fedsb"]
        if section.init_lr == 0 and hasattr(cfg, "train"):  # (with local_epochs, check_config asks for init_lr)
            steps = max(1, cfg.rounds * max(1, cfg.train.local_steps))
            section = dataclasses.replace(section, init_lr=cfg.train.lr / steps)
        return dataclasses.replace(config, sections={**config.sections, "fedsb": section})

    @classmethod
    def check_config(cls, cfg) -> None:
        from fedlora.errors import ConfigError

        if cfg.dp.enabled and not cfg.fedsb.unaccounted_init:
            raise ConfigError("method 'fedsb' fits its initial A, B and R on the loss gradient of "
                              f"fedsb.init_examples = {cfg.fedsb.init_examples} server-held rows (in simulation: "
                              "drawn from the clients' training rows), which the clients' DP-SGD accounting does "
                              "not cover; set fedsb.unaccounted_init = true only if the server may use those rows "
                              "openly (the authors' code does so without saying)")
        if cfg.fedsb.init_lr == 0 and cfg.train.local_epochs > 0:
            raise ConfigError("fedsb.init_lr = 0 derives eta' = train.lr / (rounds x train.local_steps), but with "
                              "train.local_epochs the number of local steps depends on each client's data; set "
                              "fedsb.init_lr explicitly")
        if cfg.model.head_init == "zero":
            raise ConfigError("method 'fedsb' fits its initialisation to gradients that reach the LoRA layers "
                              "through the classification head; a zero head passes none back. Use "
                              "model.head_init = 'auto' or 'random'")

    def init_examples(self) -> int:
        return self.section("fedsb").init_examples

    def initial_from_gradients(self, initial: Adapter, gradients: dict[str, torch.Tensor]) -> Adapter:
        from fedlora.errors import ModelError

        if all(not torch.any(g) for g in gradients.values()):
            raise ModelError("fedsb: the loss gradient of every LoRA-wrapped weight is zero on the server's sample; "
                             "LoRA-SB's initialisation has nothing to approximate")
        step = self.section("fedsb").init_lr
        modules = {}
        for name, m in initial.modules.items():
            A, B, R = lora_sb_factors(gradients[name], m.rank, step, m.scale)
            modules[name] = LoraModule(A.to(m.A.dtype), B.to(m.B.dtype), m.alpha, R.to(m.A.dtype))
        return Adapter(modules, {k: v.clone() for k, v in initial.head.items()})

    def init_state(self, initial: Adapter) -> ServerState:
        return ServerState(initial.clone(), {"holding": []})

    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        roles = frozenset({ROLE_R}) | self.head_roles()
        factors = frozenset({ROLE_A, ROLE_B})
        holding = set(state.extra.get("holding", []))
        small = state.adapter.to_flat(roles)
        full = state.adapter.to_flat(roles | factors)
        return [ClientPlan(cid, small if cid in holding else full, train=roles, upload=roles, keep=factors,
                           config={"returning": cid in holding}) for cid in client_ids]

    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        lost = {u.client_id for u in updates if u.report.get("state_restarted")}
        kept = [u for u in updates if u.client_id not in lost]
        new = self.average(state, kept)
        holding = (set(state.extra.get("holding", [])) | {u.client_id for u in kept}) - lost
        return ServerState(new.adapter, {**new.extra, "holding": sorted(holding)})
