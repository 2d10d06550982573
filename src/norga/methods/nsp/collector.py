"""The statistics pass of VPT-NSP²: one prompted forward over a task's images, recording in every prompted block
the image tokens' queries and their attention on the prompts (spec §3.2) into `LayerStatistics`.

The forward runs as any other (under the run's autocast: frozen weights may be held in bf16); the recorded features
are recomputed in float32 from the block's own LayerNorm output and its query / key weights, with autocast off,
because bf16 would blur the small eigenvalues that decide the null space (spec §12.2, §12.7).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from norga.methods.nsp.statistics import LayerStatistics, TaskStatistics, prompt_attention
from norga.nn.attachments import OutputHook, ProjectedPrefix
from norga.nn.prefix_attention import PrefixAttention
from norga.runtime.context import RunContext


def _rows(attention: PrefixAttention, x: Tensor, part: int) -> Tensor:
    """Queries (part 0) or keys (part 1) of tokens `x` (B, N, D) after ``norm1``, per head (B, H, N, d), in float32,
    with the attention's q_norm / k_norm."""
    width = attention.num_heads * attention.head_dim
    rows = slice(part * width, (part + 1) * width)
    bias = attention.qkv.bias
    projected = F.linear(x.float(), attention.qkv.weight[rows].float(), None if bias is None else bias[rows].float())
    heads = projected.reshape(x.shape[0], x.shape[1], attention.num_heads, attention.head_dim).transpose(1, 2)
    return (attention.q_norm if part == 0 else attention.k_norm)(heads)


def key_weight(block: nn.Module) -> Tensor:
    """The block's key weight (H·d, D) in float32: the rows of ``attn.qkv`` that make the keys."""
    attention = block.attn
    width = attention.num_heads * attention.head_dim
    return attention.qkv.weight[width : 2 * width].float()


def prompt_keys(block: nn.Module, prompt: Tensor) -> Tensor:
    """The prompt's keys (1, H, M, d) in float32, as `ProjectedPrefix` makes them: ``norm1``, key rows, k_norm."""
    with torch.autocast(prompt.device.type, enabled=False):
        return _rows(block.attn, block.norm1(prompt.detach().float()), 1)


def recorder(block: nn.Module, keys: Tensor, statistics: LayerStatistics) -> Callable[[Tensor, Tensor], Tensor]:
    """An ``attn.qkv`` output transform that adds the batch's image queries and prompt attention to `statistics`
    and leaves the output as it is."""
    attention = block.attn

    def record(normed: Tensor, output: Tensor) -> Tensor:
        with torch.autocast(normed.device.type, enabled=False):
            queries, image_keys = _rows(attention, normed, 0), _rows(attention, normed, 1)
            statistics.add(queries, prompt_attention(queries, image_keys, keys, attention.scale))
        return output

    return record


@torch.no_grad()
def collect_statistics(context: RunContext, prompts: Mapping[int, Tensor], dataset: Dataset, batch_size: int,
                       per_batch_mean: bool) -> dict[int, LayerStatistics]:
    """Statistics of every prompted block (block index -> prompt (1, M, D)) over `dataset` in order, in batches of
    `batch_size`; in a distributed run each process takes whole batches and the sums are added up."""
    model = context.model
    blocks = {layer: model.backbone.blocks[layer] for layer in prompts}
    statistics = {layer: LayerStatistics.empty(model.num_heads, model.head_dim, prompt.shape[1], per_batch_mean,
                                               device="cpu") for layer, prompt in prompts.items()}
    keys = {layer: prompt_keys(blocks[layer], prompt) for layer, prompt in prompts.items()}

    def record(images: Tensor, labels: Tensor, rows: slice) -> tuple:
        attachments = {layer: [ProjectedPrefix(prompt), OutputHook("attn.qkv", recorder(blocks[layer], keys[layer],
                                                                                         statistics[layer]))]
                       for layer, prompt in prompts.items()}  # the prefix first: its own qkv pass is not recorded
        with context.autocast():
            model.forward_features(images, attachments)
        return ()

    context.map_batches(dataset, batch_size, record)
    if context.dist.enabled:
        for stats in statistics.values():
            stats.query_gram.copy_(context.dist.all_sum(stats.query_gram))
            stats.attention_gram.copy_(context.dist.all_sum(stats.attention_gram))
            stats.images, stats.batches = int(context.dist.all_sum(stats.images)), int(
                context.dist.all_sum(stats.batches))
    return statistics


def task_statistics(statistics: Mapping[int, LayerStatistics], names: Mapping[int, str]) -> TaskStatistics:
    """The blocks' statistics keyed by their prompts' parameter names."""
    return TaskStatistics({names[layer]: stats for layer, stats in statistics.items()})
