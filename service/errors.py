"""Every error the gateway answers with, and its HTTP status: mapped in one handler (api/app.py).

ServiceError                 base; `status` is the HTTP status, str(exc) the message
+-- BadRequest       400     the request is malformed or does not fit the model's contract
|   +-- NotFound     404     no such model or job
|   +-- ReceiveTimeout 408   the client stopped sending in the middle of a request (--receive-timeout-s)
|   +-- NotReady     409     the job has not finished yet
|   +-- Gone         410     the job was deleted while its synchronous request waited for it
|   +-- TooLarge     413     the body (or a decoded image or volume) is over the configured limit
|   +-- UnsupportedMedia 415 the body or an upload is not a format the endpoint reads
|   +-- Unprocessable    422 well-formed request, unusable content: corrupt image, bad NIfTI, empty sentence
|   +-- HeadTooLarge     431 a request's head (request line and headers) is over 64 KiB
+-- Unavailable      503     retry later: queue full (Retry-After) or no ready replica
+-- DeadlineExpired  504     the request's timeout passed before it was answered
+-- InferenceFailed  500     the model raised while running a valid request
+-- NotSupported     501     a Triton endpoint or RPC the gateway does not offer; the message says what to use
WorkerDied                   not an HTTP error: the dispatcher retries the batch once elsewhere
"""

from __future__ import annotations


class ServiceError(Exception):
    status = 500

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BadRequest(ServiceError):
    status = 400


class NotFound(BadRequest):
    status = 404


class UnknownModel(NotFound):
    pass


class Gone(BadRequest):
    status = 410


class TooLarge(BadRequest):
    status = 413


class ReceiveTimeout(BadRequest):
    status = 408


class NotReady(BadRequest):
    status = 409


class UnsupportedMedia(BadRequest):
    status = 415


class Unprocessable(BadRequest):
    status = 422


class HeadTooLarge(BadRequest):
    status = 431


class Unavailable(ServiceError):
    status = 503


class DeadlineExpired(ServiceError):
    status = 504


class InferenceFailed(ServiceError):
    status = 500


class NotSupported(ServiceError):
    status = 501


# Triton protocol extensions the gateway does not offer, with what to do instead (HTTP 501, gRPC UNIMPLEMENTED).
UNSUPPORTED = {
    "cuda_shared_memory": "CUDA shared memory is not supported: use system shared memory (/v2/systemsharedmemory)",
}


class WorkerDied(Exception):
    """The worker process serving a batch exited; the batch may be retried on another replica, unless the kernel
    killed the worker for memory (`for_memory`): then the batch may be what outgrew it (service/dispatch/batcher.py)."""

    def __init__(self, message: str, *, for_memory: bool = False) -> None:
        super().__init__(message)
        self.for_memory = for_memory
