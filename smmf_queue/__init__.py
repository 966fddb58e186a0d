"""smmf-queue: many LLM, embedding and reranker models behind one interface, on per-model Celery
queues."""

from .client import AsyncClient, Client
from .config import ConfigWarning, ModelConfig, SmmfConfig, load_config
from .errors import (
    BrokerUnavailable,
    ConfigError,
    DispatchError,
    JobError,
    JobFailed,
    JobTimeout,
    NoLiveWorker,
    ProviderUnavailable,
    QueueFull,
    RequestError,
    SmmfError,
    UnknownJob,
    UnknownModel,
    UnsupportedParameter,
    WrongModelKind,
)
from .jobs import (
    ChatDelta,
    ChatResult,
    EmbeddingResult,
    RerankItem,
    RerankResult,
    ToolCall,
    ToolCallDelta,
    Usage,
)

__all__ = [
    # clients
    "Client",
    "AsyncClient",
    # config
    "load_config",
    "SmmfConfig",
    "ModelConfig",
    "ConfigWarning",
    # results
    "ChatDelta",
    "ChatResult",
    "EmbeddingResult",
    "RerankResult",
    "RerankItem",
    "ToolCall",
    "ToolCallDelta",
    "Usage",
    # errors
    "SmmfError",
    "ConfigError",
    "RequestError",
    "UnknownModel",
    "UnknownJob",
    "UnsupportedParameter",
    "WrongModelKind",
    "DispatchError",
    "BrokerUnavailable",
    "NoLiveWorker",
    "QueueFull",
    "JobError",
    "JobFailed",
    "JobTimeout",
    "ProviderUnavailable",
]
