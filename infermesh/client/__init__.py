"""Python client of infermesh for other backend services.

```python
from infermesh.client import Client

with Client("127.0.0.1:50051") as client:
    print(client.generate("Name the capital of France.", max_tokens=32).text)
```

`AsyncClient` offers the same calls for asyncio. Results are plain dataclasses; failures
raise `InfermeshError` subclasses. Retries on UNAVAILABLE (with the server's pushback)
are done by gRPC itself through the channel's service config.
"""

from infermesh.client.aio import AsyncClient
from infermesh.client.channel import NO_RETRIES, ChannelSettings, RetryPolicy
from infermesh.client.errors import (
    ConnectionFailed,
    DeadlineExceeded,
    InfermeshError,
    InvalidArgument,
    NotFound,
    Overloaded,
    PermissionDenied,
    Unauthenticated,
    Unavailable,
)
from infermesh.client.sync import Client
from infermesh.client.types import (
    BatchItem,
    BatchJob,
    BatchResult,
    BatchState,
    Chunk,
    ClusterStatus,
    Completion,
    Embedding,
    Embeddings,
    FinishReason,
    GenerateOptions,
    HistoryMessage,
    Message,
    Models,
    Priority,
    Role,
    Session,
    Usage,
)

__all__ = [
    "NO_RETRIES",
    "AsyncClient",
    "BatchItem",
    "BatchJob",
    "BatchResult",
    "BatchState",
    "ChannelSettings",
    "Chunk",
    "Client",
    "ClusterStatus",
    "Completion",
    "ConnectionFailed",
    "DeadlineExceeded",
    "Embedding",
    "Embeddings",
    "FinishReason",
    "GenerateOptions",
    "HistoryMessage",
    "InfermeshError",
    "InvalidArgument",
    "Message",
    "Models",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "Priority",
    "RetryPolicy",
    "Role",
    "Session",
    "Unauthenticated",
    "Unavailable",
    "Usage",
]
