"""Federated LoRA methods, one file each, registered by name (see :mod:`fedlora.methods.base`)."""
from fedlora.methods import (fedex, fedit, fedra, fedsa, fedsvd, ffa, flexlora, flora, hetlora, lorafair,  # noqa: F401
                             pilot, rolora)  # (registration side effect)
from fedlora.methods.base import (ClientPlan, Method, ServerState, Update, available_methods, get_method,
                                  method_summaries, register)

__all__ = ["ClientPlan", "Method", "ServerState", "Update", "available_methods", "get_method", "method_summaries",
           "register"]
