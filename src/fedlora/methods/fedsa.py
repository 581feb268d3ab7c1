"""FedSA-LoRA (Guo et al., "Selective Aggregation for Low-Rank Adaptation in Federated Learning", ICLR 2025):
share A, keep B — a personalised method.

Every client trains both factors (and the head).  Only A is uploaded and averaged, ``A ← Σ_k p_k A_k`` (the paper's
finding: A learns what is general, B what is client-specific); each client keeps its own B and head
(``ClientPlan.keep``) and starts its next round from the global A with *its* B and head, so client k's model is
``W0 + s·B_k Ā``.  A client that has not trained yet starts its part from the shared-seed initial adapter (B = 0, the
initial head).  The result is personalised: each client's own model on its local validation rows
(``personal_accuracy``: per client, mean and minimum), which becomes the run's headline score; the global model
(Ā with B = 0) scores the base model only and is reported for completeness.

Our choices, against the authors' code (Pengxin-Guo/FedSA-LoRA on FederatedScope, ``glue/yamls/fedsa-lora.yaml``,
``personalization.local_param: ['lora_B', 'classifier']``):

* **B and the head are truly per client.**  The released config sets ``share_local_model: True``, under which all
  clients and the server share one model object, so B and the head are handed from client to client within a round
  and every client evaluates the last one's; FederatedScope itself says that mode cannot support personalised
  methods; the server shares that object too, so the code's "global" score is likely ``W0 + s·B_last·Ā``, not our
  B = 0 global part.  We implement the paper's rule (``share_local_model: False``).
* **Weights** ``p_k = n_k / Σ n`` (data size); the code weighs by examples processed in the round, which is uniform
  for clients holding more than ``local steps × batch`` examples.
* The code trains in fp16 with plain SGD (lr 0.02 in the config; the maintainer reports 0.005 is needed to reproduce
  Table 1); precision and optimiser here are the run's (``train.*``).
* Personalised evaluation is off under DP, as every per-client score (docs/methods.md §7): a client's accuracy on its
  own rows is a statistic of its data outside the privacy accounting.  Without it the run could only report the
  global part (the base model), so FedSA-LoRA refuses DP and ``eval.per_client = false`` before any work starts.
* The personalised mean and minimum run over every client with validation rows; one that never trained (client
  sampling below 1) is scored with B = 0 and the initial head, as the code would.

Kept tensors live with the client: a file per client in the in-process engine (``RUN_DIR/client_state/``, versioned
so that resume is exact), the node's ``context.state`` on Flower.  A client that trained before but lost its state
restarts its part from the initial adapter and says so (``state_restarted`` in the round's metrics).
"""
from __future__ import annotations

from fedlora.adapters import ROLE_A, ROLE_B
from fedlora.methods.base import ClientPlan, Method, ServerState, Update, register


@register
class FedSALoRA(Method):
    name = "fedsa"
    summary = ("FedSA-LoRA: A is averaged and shared; each client keeps its own B and head (personalised; scored "
               "on each client's own validation rows).")
    citation = "Guo et al., Selective Aggregation for Low-Rank Adaptation in Federated Learning, ICLR 2025"
    accepts_server_optimizer = True
    secure_aggregation = True

    @classmethod
    def check_config(cls, cfg) -> None:
        """Its result is each client's own model on its own rows; without that evaluation (under DP, or with
        ``eval.per_client = false``) the run would report the global part alone — the base model — as its score."""
        from fedlora.errors import ConfigError

        if cfg.dp.enabled or not cfg.eval.per_client:
            why = ("under DP a client's score on its own rows is a statistic of its data outside the privacy "
                   "accounting, so per-client evaluation is off" if cfg.dp.enabled else "eval.per_client = false")
            raise ConfigError(f"method 'fedsa' is personalised: its result is each client's own model scored on its "
                              f"own validation rows, and {why}; the global part alone (A with B = 0) is the base "
                              f"model. Run fedsa without DP and with eval.per_client = true")

    def personal_roles(self) -> frozenset[str]:
        return frozenset({ROLE_B}) | self.head_roles()

    def init_state(self, initial) -> ServerState:
        return ServerState(initial.clone(), {"trained": []})

    def configure(self, round_idx: int, state: ServerState, client_ids: list[int]) -> list[ClientPlan]:
        download = state.adapter.to_flat(frozenset({ROLE_A}))
        train = frozenset({ROLE_A}) | self.personal_roles()
        trained = set(state.extra.get("trained", []))
        return [ClientPlan(cid, download, train=train, upload=frozenset({ROLE_A}), keep=self.personal_roles(),
                           config={"returning": cid in trained}) for cid in client_ids]

    def aggregate(self, round_idx: int, state: ServerState, updates: list[Update]) -> ServerState:
        new = self.average(state, updates)
        trained = sorted(set(state.extra.get("trained", [])) | {u.client_id for u in updates})
        return ServerState(new.adapter, {**new.extra, "trained": trained})
