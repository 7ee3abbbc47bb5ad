"""Tensor parallelism (`--tensor-parallel-size N`): one engine, its decoder sharded over N processes of one host.

Rank 0 is the server: it holds the scheduler, the vision tower's work, the sampler and the KV-cache manager. Every
rank (rank 0 included) holds one slice of each decoder layer — a share of the attention heads (their Q/K/V rows,
KV heads replicated where there are fewer than ranks) and of the MLP's columns — and its own paged KV cache for its
heads. Each forward rank 0 runs, it first broadcasts the forward's inputs (merged prompt embeddings, positions and
the attention metadata: `step`); the workers (`worker`) run the same forward on their shard; the row-parallel
output projections sum the ranks' partial results with one all-reduce each (`layers`). Only rank 0 computes logits.

- `group`: process groups (NCCL or gloo for tensors, gloo for the small step headers), rank-0 agreement helpers;
- `sharding`: which rows/columns of which weight each rank holds, per family, and the refusal of the rest;
- `shard_loader`: builds the model with parameters on the meta device, then reads only this rank's slices from
  the safetensors files;
- `step`: the per-forward broadcast; `worker`: a worker's loop; `launch`: start and stop the workers from rank 0.
"""
