"""Triton's model configuration and statistics extensions: what the gateway runs, and how it went.

`model_config` is the model's `config.pbtxt` as Triton's `ModelConfig` message,
with the batching the gateway really applies (`serve --max-batch-size`,
`--max-queue-delay-ms`, `--preferred-batch-sizes` included) and one instance
group per partition the model is placed on. `ModelStatistics` counts what Triton
counts, per model, so `tritonclient`'s `get_model_config` and
`get_inference_statistics` (and tools built on them) work against the gateway:

- success, fail: each request, arrival to answer (fail: any answer but 200);
- queue: each request, from entering the model's queue to its batch's dispatch;
- compute_input: the gateway's copy of the batch into the partition's shared memory;
- compute_infer: the batch's round trip to the partition (the model run);
- compute_output: cutting the batch's outputs into each request's rows.

As in Triton, every request of a batch is charged the whole batch's compute times,
`batch_stats` counts executions per batch size, `inference_count` counts rows and
`execution_count` batches. Both protocols render the same protobuf message:
gRPC as is, HTTP as Triton's JSON (field names as in the proto, 64-bit integers
as numbers).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from tritonclient.grpc import model_config_pb2, service_pb2

from .dispatch.batcher import BatchPolicy
from .partitions import Partition, PartitionKind

INSTANCE_KINDS = {
    PartitionKind.MIG: model_config_pb2.ModelInstanceGroup.KIND_GPU,
    PartitionKind.GPU: model_config_pb2.ModelInstanceGroup.KIND_GPU,
    PartitionKind.CPU: model_config_pb2.ModelInstanceGroup.KIND_CPU,
    PartitionKind.TRITON: model_config_pb2.ModelInstanceGroup.KIND_AUTO,  # the remote server places it
}
_INTEGERS = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def model_config(declared: Any, policy: BatchPolicy, partitions: Iterable[Partition]) -> Any:
    """The model's config.pbtxt (`declared`, a `ModelConfig` message) with the gateway's batching and placement."""
    config = model_config_pb2.ModelConfig()
    config.CopyFrom(declared)
    config.version_policy.latest.num_versions = 1
    config.max_batch_size = policy.max_batch_size
    batching = config.dynamic_batching
    batching.max_queue_delay_microseconds = round(policy.max_queue_delay_s * 1e6)
    del batching.preferred_batch_size[:]
    batching.preferred_batch_size.extend(size for size in policy.preferred_batch_sizes if size <= policy.max_batch_size)
    del config.instance_group[:]
    for partition in partitions:
        config.instance_group.add(name=partition.id, kind=INSTANCE_KINDS[partition.kind], count=1)
    return config


def as_json(message: Message) -> dict[str, Any]:
    """A message as Triton's HTTP endpoints write it: proto field names, every field, integers as numbers
    (protobuf's own JSON mapping writes 64-bit integers as strings)."""
    value: dict[str, Any] = json_format.MessageToDict(message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _numbers(value, message.DESCRIPTOR)
    return value


def _numbers(value: dict[str, Any], descriptor: Any) -> None:
    for name, item in value.items():
        fd = descriptor.fields_by_name[name]
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            entry = fd.message_type.fields_by_name["value"]
            if entry.message_type is not None:
                for nested in item.values():
                    _numbers(nested, entry.message_type)
            elif entry.cpp_type in _INTEGERS:
                value[name] = {k: int(v) for k, v in item.items()}
        elif fd.message_type is not None:
            for nested in item if isinstance(item, list) else [item]:
                _numbers(nested, fd.message_type)
        elif fd.cpp_type in _INTEGERS:
            value[name] = [int(v) for v in item] if isinstance(item, list) else int(item)


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        """`count` events that each took `seconds`."""
        self.count += count
        self.ns += int(seconds * 1e9) * count

    def into(self, stat: Any) -> None:
        stat.count, stat.ns = self.count, self.ns

    def merge(self, other: Duration) -> None:
        self.count += other.count
        self.ns += other.ns


@dataclass(slots=True)
class BatchDurations:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)

    def merge(self, other: BatchDurations) -> None:
        self.compute_input.merge(other.compute_input)
        self.compute_infer.merge(other.compute_infer)
        self.compute_output.merge(other.compute_output)


@dataclass(slots=True)
class ModelStatistics:
    name: str
    last_inference_ms: int = 0  # wall clock of the last answered batch, ms since the epoch (0: none yet)
    inference_count: int = 0  # rows answered
    execution_count: int = 0  # batches answered
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute: BatchDurations = field(default_factory=BatchDurations)  # per request
    batches: dict[int, BatchDurations] = field(default_factory=dict)  # per execution, by rows

    def request_done(self, ok: bool, seconds: float) -> None:
        (self.success if ok else self.fail).add(seconds)

    def merge(self, other: ModelStatistics) -> None:
        """Add another process's counts of the same model (serve --frontends)."""
        self.last_inference_ms = max(self.last_inference_ms, other.last_inference_ms)
        self.inference_count += other.inference_count
        self.execution_count += other.execution_count
        for mine, theirs in ((self.success, other.success), (self.fail, other.fail), (self.queue, other.queue)):
            mine.merge(theirs)
        self.compute.merge(other.compute)
        for rows, durations in other.batches.items():
            self.batches.setdefault(rows, BatchDurations()).merge(durations)

    def batch_done(self, rows: int, queued: Iterable[float], input_s: float, infer_s: float, output_s: float) -> None:
        """A batch answered: its rows, each request's time in the queue, and the batch's three compute times."""
        requests = 0
        for seconds in queued:
            self.queue.add(seconds)
            requests += 1
        self.inference_count += rows
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000
        per_batch = self.batches.get(rows)
        if per_batch is None:
            per_batch = self.batches[rows] = BatchDurations()
        for durations, count in ((self.compute, requests), (per_batch, 1)):
            durations.compute_input.add(input_s, count)
            durations.compute_infer.add(infer_s, count)
            durations.compute_output.add(output_s, count)

    def message(self) -> Any:
        """Triton's `ModelStatistics` message for this model."""
        stats = service_pb2.ModelStatistics(
            name=self.name,
            version="1",
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
        )
        infer = stats.inference_stats
        for duration, stat in (
            (self.success, infer.success),
            (self.fail, infer.fail),
            (self.queue, infer.queue),
            (self.compute.compute_input, infer.compute_input),
            (self.compute.compute_infer, infer.compute_infer),
            (self.compute.compute_output, infer.compute_output),
        ):
            duration.into(stat)
        infer.cache_hit.SetInParent()  # no response cache: zero, written out as Triton does
        infer.cache_miss.SetInParent()
        for rows in sorted(self.batches):
            durations = self.batches[rows]
            batch = stats.batch_stats.add(batch_size=rows)
            durations.compute_input.into(batch.compute_input)
            durations.compute_infer.into(batch.compute_infer)
            durations.compute_output.into(batch.compute_output)
        return stats
