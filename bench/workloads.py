"""What the benchmark steps: parameter sets shaped like real models, and the byte model.

The optimizer step never looks at the model, only at the list of parameter tensors and
their gradients, so a workload is a list of shapes. The shapes are generated from each
architecture's definition (the same layer rules as the usual torchvision / transformer
code), not typed in by hand:

* ``resnet18``  — 11,689,512 parameters in 62 tensors (conv weights without bias, BN
  weight + bias, fc weight + bias), ImageNet head (1000 classes);
* ``resnet50``  — 25,557,032 parameters in 161 tensors;
* ``transformer`` — a 6-layer encoder block stack (d_model 512, FFN 2048, pre-norm) with
  an 8192-token embedding: 23,109,632 parameters in 75 tensors;
* ``small``     — 1,200 small tensors (biases, norm weights, tiny kernels; odd sizes on
  purpose), 825,900 parameters: the case where per-tensor launch and Python overhead, not
  memory bandwidth, sets the step time.

The byte model (:func:`bytes_per_param`) counts, for each algorithm and base optimizer,
the tensor elements an ideal fused implementation must read and write per parameter per
step (docs/byte-model.md; each algorithm's count is its ``bench.accesses`` in
:mod:`sharpopt.registry`); multiplied by the element size of the parameter dtype it gives
bytes, and ``bytes × n_params / time`` is the effective bandwidth a provider reaches.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import torch

from sharpopt import registry

Shape = Tuple[int, ...]


# -- architectures --------------------------------------------------------------------
def _conv_bn(cin: int, cout: int, k: int) -> List[Shape]:
    return [(cout, cin, k, k), (cout,), (cout,)]


def resnet_shapes(blocks: Sequence[int], bottleneck: bool, num_classes: int = 1000) -> List[Shape]:
    """Parameter shapes of a torchvision-style ResNet (v1.5), in registration order."""
    shapes = _conv_bn(3, 64, 7)
    expansion = 4 if bottleneck else 1
    cin = 64
    for stage, n in enumerate(blocks):
        width = 64 * 2 ** stage
        cout = width * expansion
        for b in range(n):
            stride = 2 if (b == 0 and stage > 0) else 1
            if bottleneck:
                shapes += _conv_bn(cin, width, 1) + _conv_bn(width, width, 3) + _conv_bn(width, cout, 1)
            else:
                shapes += _conv_bn(cin, width, 3) + _conv_bn(width, width, 3)
            if stride != 1 or cin != cout:
                shapes += _conv_bn(cin, cout, 1)
            cin = cout
    shapes += [(num_classes, cin), (num_classes,)]
    return shapes


def transformer_shapes(layers: int = 6, d: int = 512, ffn: int = 2048, vocab: int = 8192
                       ) -> List[Shape]:
    """A pre-norm encoder stack: embedding, per layer LN / QKV / out-proj / LN / FFN, final LN."""
    shapes: List[Shape] = [(vocab, d)]
    for _ in range(layers):
        shapes += [(d,), (d,),                  # LayerNorm 1
                   (3 * d, d), (3 * d,),        # fused QKV projection
                   (d, d), (d,),                # attention output projection
                   (d,), (d,),                  # LayerNorm 2
                   (ffn, d), (ffn,),            # FFN up
                   (d, ffn), (d,)]              # FFN down
    shapes += [(d,), (d,)]                      # final LayerNorm
    return shapes


def small_tensor_shapes(n: int = 1200) -> List[Shape]:
    """Many small tensors: a repeating mix of bias/norm vectors and tiny kernels."""
    cycle: List[Shape] = [(64,), (123,), (256,), (1000,), (32, 33), (16, 3, 3, 3), (511,),
                          (2064,)]
    return [cycle[i % len(cycle)] for i in range(n)]


WORKLOADS: Dict[str, Tuple[str, callable]] = {
    "resnet18": ("ResNet-18", lambda: resnet_shapes([2, 2, 2, 2], bottleneck=False)),
    "resnet50": ("ResNet-50", lambda: resnet_shapes([3, 4, 6, 3], bottleneck=True)),
    "transformer": ("Transformer 6x512", transformer_shapes),
    "small": ("1200 small tensors", small_tensor_shapes),
}


def numel(shape: Shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


@dataclass
class ParamSet:
    """Parameters (``nn.Parameter``) and ``n_grads`` pre-made gradient sets for them."""

    name: str
    title: str
    params: List[torch.nn.Parameter]
    grad_sets: List[List[torch.Tensor]]

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def n_tensors(self) -> int:
        return len(self.params)

    def use_grads(self, k: int) -> None:
        """Point every ``p.grad`` at gradient set ``k`` (no copy: what a backward pass that
        writes fresh gradients leaves behind, at zero bytes moved)."""
        for p, g in zip(self.params, self.grad_sets[k % len(self.grad_sets)]):
            p.grad = g

    def clone_state(self) -> List[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def fork(self, values: Sequence[torch.Tensor]) -> "ParamSet":
        """A parameter set with new parameter objects holding copies of ``values``, sharing
        this set's gradients (each provider steps its own parameters)."""
        return ParamSet(self.name, self.title,
                        [torch.nn.Parameter(v.clone()) for v in values], self.grad_sets)


def make_params(name: str, dtype: torch.dtype, device: torch.device, n_grads: int = 3,
                seed: int = 0) -> ParamSet:
    """Random weights (std 0.05) and gradients (std 0.01) of workload ``name``."""
    title, fn = WORKLOADS[name]
    shapes = fn()
    gen = torch.Generator(device="cpu").manual_seed(seed)

    def rand(shape, std):
        return (torch.randn(shape, generator=gen) * std).to(device=device, dtype=dtype)

    params = [torch.nn.Parameter(rand(s, 0.05)) for s in shapes]
    grads = [[rand(s, 0.01) for s in shapes] for _ in range(n_grads)]
    return ParamSet(name, title, params, grads)


# -- the byte model -------------------------------------------------------------------
#: Element accesses per parameter of the base update merged with the restore
#: (read saved w, d and the state; write the state and w). SGD-momentum: 5; plain SGD: 3;
#: Adam/AdamW: 7 (read saved, d, m, v; write m, v, w).
BASE_ACCESSES = {"sgd": 5, "sgd-plain": 3, "adamw": 7}

def _bench_entry(algo: str) -> registry.Algorithm:
    for entry in registry.ALGORITHMS.values():
        if entry.bench is not None and entry.bench.key == algo:
            return entry
    raise ValueError(f"unknown algorithm {algo!r}")


def algo_note(algo: str) -> str:
    """How the algorithm's own accesses are counted (the registry's ``bench.note``)."""
    return _bench_entry(algo).bench.note


def accesses_per_param(algo: str, base: str, **kw) -> float:
    """Element accesses per parameter per step (per call, averaged, for LookSAM): the
    registry's ``bench.accesses`` of the algorithm's own passes (each the minimum a fused
    implementation needs: a reduction must finish before the elementwise pass that uses
    it) plus ``BASE_ACCESSES[base]``. ``kw`` replaces the benchmark's hyper-parameters
    (``k``, ``inner_steps``, ...)."""
    bench = _bench_entry(algo).bench
    return bench.accesses(BASE_ACCESSES[base], {**bench.kwargs, **kw})


def bytes_per_param(algo: str, base: str, dtype: torch.dtype, **kw) -> float:
    """Ideal fused bytes per parameter per step: accesses × the parameter's element size.

    Gradients, the saved copy and the optimizer state have the parameter's dtype (as
    torch.optim keeps them), so bf16 parameters move half the bytes of fp32 ones. Norms,
    row means and scalars are a few bytes per tensor and are not counted.
    """
    return accesses_per_param(algo, base, **kw) * torch.empty((), dtype=dtype).element_size()
