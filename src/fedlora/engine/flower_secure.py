"""Secure aggregation on the Flower engine (``secure.aggregation = true``): SecAgg+ (Bell et al., CCS 2020; the
dropout-robust secure sum of Bonawitz et al., CCS 2017, over a sparse neighbour graph) with Flower's own
``SecAggPlusWorkflow`` on the ServerApp and its ``secaggplus_mod`` on the ClientApp.

A round has the protocol's four stages: keys are agreed (setup, share keys), every client trains and uploads its
tensors quantised, weighted by its number of examples and masked (collect masked vectors), and the survivors send the
shares that remove the masks of the sum (unmask).  What reaches the ServerApp of a client's tensors is one vector of
integers modulo 2**32 that looks uniformly random; only their sum is ever unmasked, so an honest-but-curious server
learns the data-weighted average of the uploads and nothing about any one of them.  In the clear, as in FitRes: each
client's number of examples, its training report (DP-SGD steps, for the privacy accountant; no loss under DP), the
reason a failed client gives (worded to say nothing of its values), and a personalised method's per-client score.
A node started with ``secure-only=true`` refuses a plain train message, so the node enforces what the server promises.

Only methods whose aggregate is the data-weighted average of what clients upload and nothing more
(``Method.secure_aggregation``: FedIT, FFA-LoRA, FedSA-LoRA, RoLoRA) can work this way; the others need each client's
update (FlexLoRA's products, HetLoRA's norms, FLoRA's stacks, FedEx-LoRA's residual, Fed-piLot's layers, Fed-SB's
dropping of restarted clients' cores) and are refused before any work (:func:`fedlora.engine.prepare.check_secure`),
as are robust rules (a median or a norm bound needs each update).

Where we differ from Flower's workflow as shipped:

* a client whose node is gone before its key shares went out (setup or share-keys stage) is taken out of the round
  and out of every neighbourhood: nobody masks with it, so nothing of it needs unmasking (Bonawitz et al.'s users that
  drop before round 2).  Flower 1.41 would still ask the others for shares of its secret, which nobody holds, and halt
  the round.  A client that drops later, while training, is what SecAgg+ recovers from: its neighbours' shares remove
  its pairwise masks.  (Any mix of the two in one round gives the survivors' average: tested on four in-process
  nodes running Flower's mod.)
* the server then hands the method one copy of the unmasked average per surviving client (with its own number of
  examples and report), so the method's own average, the server optimiser, the accountant and the metrics run
  unchanged: the average of equal tensors is that tensor.

Quantisation error: a client's values, times its weight ``n_k / max n``, are stochastically rounded to steps of
``2c / 2**bits`` (``c = secure.clipping_range``), and the weights to ``2**-bits``; each coordinate of the average is
then off by about ``K · 2c / 2**bits / R`` at most, with ``K`` clients and ``R = Σ_k n_k / max_k n_k`` (3.8e-6 for
three equal clients at the defaults; the weights' rounding adds a relative ``2**-bits``).  A client whose weighted
upload holds a value beyond ``±c``, or that has more examples than the server planned for, fails its round rather
than being clipped.  The masked integers travel in Flower's NumPy encoding (``np.save`` with ``allow_pickle=False``):
the protocol's own wire format, still no pickle.  ``round-timeout`` bounds each of the four exchanges.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

from fedlora.errors import ConfigError


# ---------------------------------------------------------------------------------------------------- server side
@dataclass
class SecureRound:
    """What one secure round gave the server: the unmasked average (key → numpy array), each contributing client's
    number of examples and report text, and what the server received (bytes, and each reply's record kinds)."""

    average: dict | None = None
    contributors: dict[int, tuple[int, str]] = field(default_factory=dict)  # node id → (num_examples, update JSON)
    bytes_in: int = 0
    bytes_out: int = 0
    received: list[dict] = field(default_factory=list)  # per reply: stage, node, record kinds, array bytes
    failures: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)  # each stage's exchange, as the server waited


PLAIN_RECORDS = ("fitins.config", "fitres.metrics")
"""The records that carry what the plain engine sends too (plan, config, download; the client's report): left out
of the protocol's byte count, the download being counted as tensors as in the plain engine."""


def content_bytes(content) -> tuple[int, int]:
    """(array bytes, other bytes) of a message's records but :data:`PLAIN_RECORDS`: tensors, then config/metric
    values (8 bytes per number)."""
    arrays = sum(len(a.data) for rec in content.array_records.values() for a in rec.values())
    other = 0
    records = [r for name, r in list(content.config_records.items()) + list(content.metric_records.items())
               if name not in PLAIN_RECORDS]
    for rec in records:
        for v in rec.values():
            for item in (v if isinstance(v, list) else [v]):
                other += len(item) if isinstance(item, (bytes, str)) else 8
    return arrays, other


class _RecordingGrid:
    """The ServerApp's grid as the workflow sees it, counting and describing everything sent and received."""

    def __init__(self, grid, record: SecureRound):
        self.grid, self.record = grid, record

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

        messages = list(messages)
        for m in messages:
            self.record.bytes_out += sum(content_bytes(m.content))
        started = time.perf_counter()
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        stage = ""
        if messages and RECORD_KEY_CONFIGS in messages[0].content.config_records:
            stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS].get("stage", ""))
        self.record.stage_seconds[stage] = round(time.perf_counter() - started, 3)
        for r in replies:
            if r.has_error():
                self.record.received.append({"stage": stage, "node": r.metadata.src_node_id, "error": True})
                continue
            arrays, other = content_bytes(r.content)
            self.record.bytes_in += arrays + other
            self.record.received.append({
                "stage": stage, "node": r.metadata.src_node_id, "array_bytes": arrays,
                "records": sorted(r.content.config_records.keys()) + sorted(r.content.metric_records.keys()),
                "keys": sorted(k for rec in r.content.config_records.values() for k in rec.keys())})
        return replies


class _Proxy:
    def __init__(self, node_id: int):
        self.node_id = node_id


class _RoundStrategy:
    """The two Strategy calls the workflow makes: the round's instructions, and the unmasked aggregate."""

    def __init__(self, fitins: list, record: SecureRound):
        self.fitins, self.record = fitins, record

    def configure_fit(self, server_round, parameters, client_manager):
        return self.fitins

    def aggregate_fit(self, server_round, results, failures):
        from flwr.common import parameters_to_ndarrays

        if results:
            self.record.average = parameters_to_ndarrays(results[0][1].parameters)
        for proxy, res in results:
            self.record.contributors[proxy.node_id] = (int(res.num_examples), str(res.metrics.get("update", "")))
        self.record.failures += [str(f) for f in failures]
        return None, {}


def _workflow_class():
    from flwr.server.workflow import SecAggPlusWorkflow

    class Workflow(SecAggPlusWorkflow):
        """Flower's SecAgg+ workflow, with the clients that left before their key shares went out taken out of the
        round (module docstring)."""

        @staticmethod
        def _keep_only_live(state) -> None:
            # nobody masks with a client whose keys or shares never came: out of the round, and out of every
            # neighbourhood (else unmasking a later dropout would remove masks that were never added)
            state.sampled_node_ids = set(state.active_node_ids)
            for nid, neighbours in state.nid_to_neighbours.items():
                neighbours &= state.sampled_node_ids | {nid}

        def setup_stage(self, grid, context, state) -> bool:
            ok = super().setup_stage(grid, context, state)
            self._keep_only_live(state)
            return ok

        def share_keys_stage(self, grid, context, state) -> bool:
            ok = super().share_keys_stage(grid, context, state)
            self._keep_only_live(state)
            return ok

    return Workflow


def run_secure_round(grid, t: int, instructions: dict[int, dict], secure, max_weight: float,
                     timeout: float | None) -> SecureRound:
    """One SecAgg+ round over ``instructions`` (node id → the plan's config values, sent as the FitIns config)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.common import FitIns, Parameters
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    record = SecureRound()
    empty = Parameters(tensors=[], tensor_type="")
    fitins = [(_Proxy(node), FitIns(empty, values)) for node, values in instructions.items()]
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                            strategy=_RoundStrategy(fitins, record))
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: t})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    shares = secure.num_shares if secure.num_shares <= 1 else int(secure.num_shares)
    threshold = (secure.reconstruction_threshold if secure.reconstruction_threshold <= 1
                 else int(secure.reconstruction_threshold))
    workflow = _workflow_class()(shares, threshold, max_weight=max_weight, clipping_range=secure.clipping_range,
                                 quantization_range=2 ** secure.quantization_bits, timeout=timeout)
    started = time.perf_counter()
    workflow(_RecordingGrid(grid, record), context)
    record.received.append({"stage": "done", "seconds": time.perf_counter() - started})
    return record


def check_round_size(clients: int, bits: int) -> None:
    """The masked sum lives modulo 2**32 and each client adds values (and a weight) of up to 2**bits: fewer than
    2**(32 - bits) clients may share a round."""
    if clients >= 2 ** (32 - bits):
        raise ConfigError(f"secure.quantization_bits = {bits} lets fewer than {2 ** (32 - bits)} clients share a "
                          f"round modulo 2**32; this round has {clients}")


def collect_secure(rnd, t, plans, eng, accountant, method, stream):
    """:class:`fedlora.engine.flower.FlowerRound`'s round under secure aggregation: the plans go out as the SecAgg+
    FitIns, and what comes back is the unmasked average, handed to the server-side checks once per contributor."""
    import numpy as np
    import torch

    from fedlora import wire
    from fedlora.engine.client_round import RoundUpdates, receive_upload
    from fedlora.engine.flower_messages import memory_to_text, plan_to_text, update_from_text

    cfg = eng.prepared.cfg
    out = RoundUpdates()
    rnd._discover({p.client_id for p in plans}, len(eng.prepared.clients))
    keys = None
    instructions, by_node = {}, {}
    for plan in plans:
        template = plan.uploaded(eng.template_for(eng.spec.ranks_of(plan)))
        shapes = {k: tuple(v.shape) for k, v in template.items()}
        if keys is None:
            keys = shapes
        elif shapes != keys:
            raise ConfigError(f"secure aggregation needs every client of a round to upload the same tensors; client "
                              f"{plan.client_id} uploads a different set in round {t}")
        payload = wire.encode(plan.download)
        merge = wire.encode(plan.merge) if plan.merge else b""
        out.down_bytes += len(payload) + len(merge)
        node = rnd.nodes.get(plan.client_id)
        if node is None:
            out.missing[plan.client_id] = "no SuperNode holds this partition"
            continue
        instructions[node] = {"plan": plan_to_text(plan), "round": t, "config": rnd.config_text,
                              "memory": memory_to_text(eng.spec), "download": payload, "merge": merge}
        by_node[node] = plan
    max_weight = float(max((len(eng.prepared.clients[p.client_id].train_rows) for p in by_node.values()), default=1))
    for values in instructions.values():
        values["max-weight"] = max_weight  # a client with more examples refuses: its weight would exceed 1
    check_round_size(len(instructions), cfg.secure.quantization_bits)
    needed = max(rnd.min_replies or len(plans), 2)
    record = SecureRound()
    if len(instructions) >= 2:
        record = run_secure_round(rnd.grid, t, instructions, cfg.secure, max_weight, rnd.round_timeout or None)
    else:
        record.failures.append("secure aggregation needs at least 2 clients in a round")
    out.down_bytes += record.bytes_out  # the protocol's own bytes (keys, shares), besides the downloads counted above
    replies = [r for r in record.received if "node" in r and not r.get("error")]
    out.secure = {"contributors": len(record.contributors), "bytes_in": record.bytes_in,
                  "bytes_out": record.bytes_out, "replies": len(replies),
                  "tensor_bytes_in": sum(r["array_bytes"] for r in replies),  # 0: no tensor arrives in the clear
                  "reply_keys": sorted({k for r in replies for k in r["keys"]}),
                  "seconds": next((r["seconds"] for r in record.received if r.get("stage") == "done"), None),
                  "stage_seconds": record.stage_seconds,
                  "failures": record.failures[:3]}
    contributors = {by_node[n].client_id: v for n, v in record.contributors.items() if n in by_node}
    for plan in plans:
        if plan.client_id not in contributors and plan.client_id not in out.missing:
            out.missing[plan.client_id] = "dropped out of the secure round"
    if record.average is None or len(contributors) < needed:
        rnd.log(f"round {t}: {len(contributors)} clients in the secure sum < {needed} needed; the global model is "
                f"unchanged" + (f" ({record.failures[0]})" if record.failures else ""))
        return out
    dtype = {k: v.dtype for k, v in eng.template_for(eng.spec.ranks_of(plans[0])).to_flat().items()}
    average = {k: torch.from_numpy(np.ascontiguousarray(a)).to(dtype.get(k, torch.float32)).reshape(keys[k])
               for k, a in zip(sorted(keys), record.average, strict=True)}
    blob = wire.encode(average)
    for plan in plans:  # plan order, as in the plain engine
        if plan.client_id in contributors:
            n, text = contributors[plan.client_id]
            update = update_from_text(text)
            if update.client_id != plan.client_id or update.num_examples != n:
                out.dropped[plan.client_id] = f"reply claims client {update.client_id} with {n} examples"
                continue
            receive_upload(eng, plan, blob, update, out, accountant, method, stream)
    out.up_bytes = record.bytes_in  # what came back: keys, shares and the masked vectors (not the reports)
    return out


# ---------------------------------------------------------------------------------------------------- client side
def secure_mod(msg, context, call_next):
    """The ClientApp's mod: a SecAgg+ message goes through Flower's ``secaggplus_mod``, anything else straight on."""
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

    if msg.metadata.message_type == "train" and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def refuse_plain_training(node_config) -> None:
    """A node started with ``--node-config "secure-only=true"`` trains only inside SecAgg+: a plain train message (a
    server that asks for an update in the clear) is refused, so the node's side enforces what the server promises."""
    if str(node_config.get("secure-only", "")).lower() in ("true", "1"):
        raise PermissionError("this SuperNode is secure-only (node config secure-only=true): it uploads only inside "
                              "SecAgg+, and this train message asked for an update in the clear")


def is_secure_train(msg) -> bool:
    """True for the SecAgg+ stage that trains (its FitIns carries the plan)."""
    return "fitins.config" in msg.content.config_records


def secure_args(msg) -> tuple[str, str, int, bytes, str, bytes, float]:
    """(config, plan JSON, round, download, memory, merge, max weight) of a secure train message."""
    rec = msg.content.config_records["fitins.config"]
    return (str(rec["config"]), str(rec["plan"]), int(rec["round"]), bytes(rec["download"]), str(rec["memory"]),
            bytes(rec["merge"]), float(rec["max-weight"]))


def secure_reply(msg, blob: bytes, update_text: str, config_text: str, max_weight: float):
    """The reply to a secure train message: :func:`secure_content`, which the SecAgg+ mod then masks."""
    from flwr.app import Message

    return Message(secure_content(blob, update_text, config_text, max_weight), reply_to=msg)


def secure_content(blob: bytes, update_text: str, config_text: str, max_weight: float):
    """The FitRes the SecAgg+ mod masks: the upload's tensors in key order and the client's number of examples; its
    report rides in the metrics, as FitRes metrics do.  The mod clips ``value · n / max_weight`` to ``±c``: a client
    whose weight would exceed 1 or whose weighted values would be clipped fails its round instead, with a reason that
    says nothing about its values (the exception text reaches the server; the values are logged on the node only)."""
    import logging

    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common import recorddict_compat as compat

    from fedlora import wire
    from fedlora.config import from_toml

    c = from_toml(config_text, where="the server's config").secure.clipping_range
    n = int(json.loads(update_text)["num_examples"])
    if n > max_weight:
        raise ValueError(f"this client has more examples than the server planned for (max-weight {max_weight:g}): "
                         f"its SecAgg+ weight would exceed 1")
    tensors = wire.decode(blob)
    arrays = [tensors[k].double().numpy() for k in sorted(tensors)]
    worst = max((float(np.abs(a).max()) for a in arrays if a.size), default=0.0)
    if worst * n / max_weight > c:
        logging.getLogger("fedlora").warning("secure aggregation: largest weighted upload value %.3g > %g",
                                             worst * n / max_weight, c)
        raise ValueError(f"an uploaded value is beyond secure.clipping_range = {c}, where SecAgg+ would clip it: "
                         f"raise secure.clipping_range")
    res = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, {"update": update_text})
    return compat.fitres_to_recorddict(res, False)
