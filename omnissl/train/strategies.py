"""`FSDP2Strategy`: Lightning's `ModelParallelStrategy` for pure data parallelism with FSDP2 (recipes/trainer/
fsdp.yaml), the device mesh's "data_parallel" dimension spanning every process of every node by default.

Lightning's own default ("auto") sizes the data-parallel dimension to the number of *nodes* and the
tensor-parallel one to the GPUs per node, for models that apply tensor parallelism in `configure_model`.
omnissl's objectives shard with `fully_shard` over the data-parallel dimension only
(`SSLModule.configure_model`), so with that default a single node of 8 GPUs fails ("data_parallel_size=1 and
tensor_parallel_size=1 multiplied should equal the world size (8)"). Everything else (launch, sharded
checkpoints, resume, the sampler's ranks) is Lightning's.
"""

from __future__ import annotations

from typing import Any, Literal

from lightning.pytorch.strategies import ModelParallelStrategy


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy whose data_parallel_size "auto" is the world size (num_nodes x devices per node) and
    whose tensor_parallel_size defaults to 1. Other arguments: ModelParallelStrategy's
    (save_distributed_checkpoint, process_group_backend, timeout)."""

    def __init__(self, data_parallel_size: Literal["auto"] | int = "auto", tensor_parallel_size: int = 1,
                 **kwargs: Any) -> None:
        if tensor_parallel_size != 1:
            raise ValueError(f"omnissl shards over data parallelism only (fully_shard per block): tensor_parallel_size "
                             f"must be 1, got {tensor_parallel_size}")
        super().__init__(data_parallel_size=data_parallel_size, tensor_parallel_size=1, **kwargs)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # Lightning would take the number of nodes
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()
