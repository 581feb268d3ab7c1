"""The Flower engine: the same experiment on a Flower federation (the simulation runtime, or a SuperLink and
SuperNodes over gRPC/TLS).

The ServerApp runs :func:`fedlora.engine.loop.run_experiment` unchanged — plans, aggregation, evaluation,
checkpoints, metrics, plots and the PEFT export are the in-process engine's — except that a round's clients are
trained by SuperNodes: :class:`FlowerRound` sends each sampled client's plan to the node that holds its partition
and feeds the replies, in plan order, to the same server-side checks.  The ClientApp runs the in-process engine's
client half (:func:`fedlora.engine.client_round.client_work`) on a base model it loads once per process.

On the wire there are tensors and text only: a plan's tensors and an upload travel as safetensors bytes (one
``Array`` with ``stype="safetensors"``, bf16 where the config says so, counted exactly as the in-process engine
counts them), and the plan's other fields and the experiment config as JSON/TOML strings.  Nothing is unpickled.

Run config keys (``[tool.flwr.app.config]`` in pyproject.toml, overridable with ``flwr run --run-config``):

- ``config``: the experiment TOML (absolute, or relative to the working directory or to the app directory);
- ``overrides``: ``--set``-style ``key=value`` overrides separated by ``;``;
- ``out-dir``: the run directory (default ``runs/flower-<time>`` under the ServerApp's working directory);
- ``min-replies``: the fewest replies a round aggregates (0 = every sampled client must answer, as in simulation);
- ``round-timeout``: seconds a round waits for replies (0 = no limit);
- ``node-wait``: seconds to wait for the SuperNodes holding the sampled partitions to connect.

Each SuperNode says which client it is with ``--node-config "partition-id=K num-partitions=N"``; ``N`` must be the
experiment's number of clients.  ``data-dir=/path`` rebases the config's relative data paths on that machine.
"""
from __future__ import annotations

import json
import os
import sys
import time
from datetime import datetime
from pathlib import Path

from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp

from fedlora.config import ExperimentConfig, load_config, to_toml
from fedlora.engine.flower_messages import (bytes_array, memory_to_text, plan_from_text, plan_to_text,  # noqa: F401
                                            update_from_text, update_to_text)
from fedlora.engine.flower_secure import secure_mod
from fedlora.errors import ConfigError

# torch, transformers and the engine are imported inside the functions that need them: a deployment's ClientApp
# process (one per message) then only relays to the node's long-lived worker (fedlora.engine.flower_worker)



def resolve_config(run_config: dict) -> ExperimentConfig:
    """The experiment config named by a Flower run config (see the module docstring)."""
    name = str(run_config.get("config", "")).strip()
    overrides = [o.strip() for o in str(run_config.get("overrides", "")).split(";") if o.strip()]
    if not name:
        return load_config(None, overrides)
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.is_file():
        for root in [Path.cwd(), *map(Path, sys.path)]:  # the app directory is on sys.path in a Flower app process
            if (root / name).is_file():
                path = root / name
                break
    if not path.is_file():
        raise ConfigError(f"run config 'config' = {name!r}: no such file (relative paths are looked up in the "
                          f"working directory and the app directory)")
    return load_config(path, overrides)


# ---------------------------------------------------------------------------------------------------- server
class FlowerRound:
    """``collect`` for :func:`run_experiment`: one round's clients trained by the SuperNodes holding them."""

    def __init__(self, grid, cfg: ExperimentConfig, min_replies: int = 0, round_timeout: float = 0.0,
                 node_wait: float = 120.0, log=print):
        self.grid, self.cfg, self.log = grid, cfg, log
        self.min_replies, self.round_timeout, self.node_wait = min_replies, round_timeout, node_wait
        self.nodes: dict[int, int] = {}  # partition id → node id
        self.config_text = to_toml(cfg)

    def _discover(self, wanted: set[int], num_clients: int) -> None:
        """Ask every connected node which partition it holds, until the wanted ones are known (or time is up)."""
        from flwr.app import ConfigRecord, Message, RecordDict

        deadline = time.time() + self.node_wait
        asked: set[int] = set(self.nodes.values())
        while True:
            fresh = [n for n in self.grid.get_node_ids() if n not in asked]
            if fresh:
                msgs = [Message(RecordDict({"ask": ConfigRecord({"what": "partition"})}), dst_node_id=n,
                                message_type="query") for n in fresh]
                for reply in self.grid.send_and_receive(msgs, timeout=30):
                    if reply.has_error():
                        continue
                    rec = reply.content["partition"]
                    pid, total = int(rec["partition-id"]), int(rec["num-partitions"])
                    if total != num_clients:
                        raise ConfigError(f"node {reply.metadata.src_node_id} says num-partitions={total}, but the "
                                          f"experiment has {num_clients} clients")
                    self.nodes[pid] = reply.metadata.src_node_id
                    asked.add(reply.metadata.src_node_id)
            if wanted <= set(self.nodes) or time.time() > deadline:
                return
            time.sleep(0.5)

    def __call__(self, t, plans, eng, prepared, accountant, progress, method=None, stream=None):
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        from fedlora import wire
        from fedlora.engine.client_round import RoundUpdates, receive_upload

        if self.cfg.secure.aggregation:  # SecAgg+: the server sees only the sum (fedlora.engine.flower_secure)
            from fedlora.engine.flower_secure import collect_secure

            return collect_secure(self, t, plans, eng, accountant, method, stream)
        out = RoundUpdates()
        wanted = {p.client_id for p in plans}
        self._discover(wanted, len(prepared.clients))
        messages, sent = [], {}
        for plan in plans:
            payload = wire.encode(plan.download)
            out.down_bytes += len(payload)
            node = self.nodes.get(plan.client_id)
            if node is None and plan.merge:
                out.down_bytes += len(wire.encode(plan.merge))
            if node is None:
                out.missing[plan.client_id] = "no SuperNode holds this partition"
                continue
            merge = wire.encode(plan.merge) if plan.merge else b""
            out.down_bytes += len(merge)
            content = RecordDict({"download": ArrayRecord({"tensors": bytes_array(payload)}),
                                  "merge": ArrayRecord({"tensors": bytes_array(merge)}),
                                  "plan": ConfigRecord({"json": plan_to_text(plan), "round": t,
                                                        "config": self.config_text,
                                                        "memory": memory_to_text(eng.spec)})})
            msg = Message(content, dst_node_id=node, message_type="train", group_id=str(t))
            messages.append(msg)
            sent[node] = plan
        replies = {}
        if messages:
            timeout = self.round_timeout or None
            for reply in self.grid.send_and_receive(messages, timeout=timeout):
                plan = sent.get(reply.metadata.src_node_id)
                if plan is None:
                    continue
                if reply.has_error():
                    out.missing[plan.client_id] = f"client error: {reply.error.reason}"
                    continue
                try:
                    blob = reply.content["upload"]["tensors"].data
                    update = update_from_text(reply.content["update"]["json"])
                except (KeyError, ValueError, TypeError, AttributeError) as exc:
                    out.dropped[plan.client_id] = f"malformed reply: {type(exc).__name__}: {exc}"
                    continue
                if update.client_id != plan.client_id:
                    out.dropped[plan.client_id] = f"reply claims client {update.client_id}"
                    continue
                replies[plan.client_id] = (blob, update)
        for plan in plans:
            if plan.client_id not in replies and plan.client_id not in out.missing | out.dropped:
                out.missing[plan.client_id] = "no reply before the round's timeout"
        needed = self.min_replies or len(plans)
        if len(replies) < needed:
            self.log(f"round {t}: {len(replies)} replies < {needed} needed; the global model is unchanged")
            for cid in replies:
                out.missing.setdefault(cid, "round not aggregated: too few replies")
            return out
        for plan in plans:  # plan order: aggregation is then the same floating-point sum as in simulation
            if plan.client_id in replies:
                blob, update = replies.pop(plan.client_id)
                receive_upload(eng, plan, blob, update, out, accountant, method, stream)
        return out


    def evaluate_clients(self, t, state, eng, method) -> dict:
        """A personalised method's per-client evaluation, run by the nodes: each gets the global part (the roles
        its client does not keep) and scores its own model on its validation rows."""
        from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

        from fedlora import wire
        from fedlora.adapters import ROLES
        from fedlora.engine.evaluate import personal_summary

        clients = [k for k, c in enumerate(eng.prepared.clients) if c.val_rows]
        self._discover(set(clients), len(eng.prepared.clients))
        shared = wire.encode(method.global_adapter(state).to_flat(frozenset(ROLES) - method.personal_roles()))
        messages, sent = [], {}
        for k in clients:
            node = self.nodes.get(k)
            if node is None:
                continue
            content = RecordDict({"shared": ArrayRecord({"tensors": bytes_array(shared)}),
                                  "plan": ConfigRecord({"config": self.config_text, "round": t})})
            messages.append(Message(content, dst_node_id=node, message_type="evaluate", group_id=f"eval-{t}"))
            sent[node] = k
        per = {}
        for reply in self.grid.send_and_receive(messages, timeout=self.round_timeout or None) if messages else []:
            k = sent.get(reply.metadata.src_node_id)
            if k is None or reply.has_error():
                continue
            score = json.loads(str(reply.content["result"]["json"])).get("score")
            if score is not None:
                per[k] = float(score)
        return personal_summary(dict(sorted(per.items())), eng.prepared.task.client_metric)


def run_on_grid(grid, run_config: dict, log=print):
    """The ServerApp's body: resolve the config, then run the experiment with :class:`FlowerRound`."""
    from fedlora.engine.loop import run_experiment

    cfg = resolve_config(run_config)
    if cfg.train.client_group > 1:
        raise ConfigError(f"train.client_group = {cfg.train.client_group} groups the clients of an in-process "
                          f"simulation; on Flower every SuperNode trains its own clients: set it to 1")
    if cfg.attack.kind != "none":
        raise ConfigError(f"attack.kind = {cfg.attack.kind!r} makes clients malicious in a simulation, to measure "
                          f"defences; a Flower deployment's clients are its SuperNodes': leave attack.* unset")
    if not run_config.get("resume", False):
        from fedlora.config_ignored import refuse_ignored

        refuse_ignored(cfg)  # as `fedlora run`: a setting this run would not read is an error, not a surprise
    out_dir = str(run_config.get("out-dir", "")).strip() or f"runs/flower-{datetime.now():%Y%m%d-%H%M%S}"
    collect = FlowerRound(grid, cfg, min_replies=int(run_config.get("min-replies", 0)),
                          round_timeout=float(run_config.get("round-timeout", 0)),
                          node_wait=float(run_config.get("node-wait", 120)), log=log)
    log(f"fedlora on Flower: {cfg.method}, {cfg.rounds} rounds -> {Path(out_dir).resolve()}")
    return run_experiment(cfg, out_dir=out_dir, progress=False, log=log, collect=collect,
                          evaluate_clients=collect.evaluate_clients, resume=bool(run_config.get("resume", False)))


# ---------------------------------------------------------------------------------------------------- client
def client_train(msg, context):
    """The ClientApp's train handler: this node's client runs its local work for the plan in ``msg`` — here when
    the process lives on (Flower's simulation runtime), else in the node's long-lived worker process, so that a
    deployment loads the base model once per node rather than once per message."""
    from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

    from fedlora.engine.flower_secure import is_secure_train, refuse_plain_training, secure_args, secure_reply

    secure = is_secure_train(msg)
    if secure:  # SecAgg+'s training stage: the plan is the FitIns config (fedlora.engine.flower_secure)
        config, plan, t, download, memory, merge, max_weight = secure_args(msg)
        args = (config, context.node_config.get("data-dir"), plan, t, download,
                int(context.node_config.get("partition-id", -1)), memory, merge)
    else:
        refuse_plain_training(context.node_config)
        rec = msg.content["plan"]
        args = (str(rec["config"]), context.node_config.get("data-dir"), str(rec["json"]), int(rec["round"]),
                msg.content["download"]["tensors"].data, int(context.node_config.get("partition-id", -1)),
                str(rec.get("memory", "")),
                msg.content["merge"]["tensors"].data if "merge" in msg.content else b"")
    kept = context.state.get("fedlora") if "fedlora" in context.state else None
    state = kept["base"].data if kept is not None and "base" in kept else None
    if _short_lived_process(context):
        from fedlora.engine.flower_worker import call_worker

        blob, update_text, state = call_worker(context.node_id, *args, state)
    else:
        from fedlora.engine.flower_client import local_round

        blob, update_text, state = local_round(*args, state)
    context.state["fedlora"] = ArrayRecord({"base": bytes_array(state)})  # Flower keeps it for this node
    if secure:
        return secure_reply(msg, blob, update_text, args[0], max_weight)
    return Message(RecordDict({"upload": ArrayRecord({"tensors": bytes_array(blob)}),
                               "update": ConfigRecord({"json": update_text})}), reply_to=msg)


def client_evaluate(msg, context):
    """The ClientApp's evaluate handler: a personalised method's evaluation of this node's client, with the tensors
    the node keeps (in the worker process in a deployment, as for training)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    rec = msg.content["plan"]
    args = (str(rec["config"]), context.node_config.get("data-dir"), msg.content["shared"]["tensors"].data,
            int(context.node_config.get("partition-id", -1)))
    kept = context.state.get("fedlora") if "fedlora" in context.state else None
    state = kept["base"].data if kept is not None and "base" in kept else None
    if _short_lived_process(context):
        from fedlora.engine.flower_worker import call_worker_evaluate

        result = call_worker_evaluate(context.node_id, *args, state)
    else:
        from fedlora.engine.flower_client import local_evaluate

        result = local_evaluate(*args, state)
    return Message(RecordDict({"result": ConfigRecord({"json": result})}), reply_to=msg)


def _short_lived_process(context) -> bool:
    """True in a deployment's per-message ``flwr-clientapp`` process (the node config can force either way with
    ``worker=true|false``)."""
    forced = str(context.node_config.get("worker", "")).lower()
    if forced in ("true", "1", "false", "0"):
        return forced in ("true", "1")
    return Path(sys.argv[0]).name == "flwr-clientapp"


def client_query(msg, context):
    from flwr.app import ConfigRecord, Message, RecordDict

    cfg = context.node_config
    return Message(RecordDict({"partition": ConfigRecord({"partition-id": int(cfg.get("partition-id", -1)),
                                                          "num-partitions": int(cfg.get("num-partitions", 0))})}),
                   reply_to=msg)


os.environ.setdefault("HF_HUB_OFFLINE", "1")

server_app = ServerApp()


@server_app.main()
def _server_main(grid, context) -> None:
    run_on_grid(grid, dict(context.run_config))


client_app = ClientApp()
client_app.train(mods=[secure_mod])(client_train)  # SecAgg+ messages pass Flower's secaggplus_mod
client_app.query()(client_query)
client_app.evaluate()(client_evaluate)
