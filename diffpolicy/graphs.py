"""Fixed-shape sampling replayed from a CUDA graph.

A policy samples the same batch shape with the same grid at every environment step, so the
whole chain (``n`` network calls plus the update ops) can be captured once as a CUDA graph and
replayed with one launch: at small batch the GPU otherwise waits on Python and kernel launches
(what ``torch.compile(mode="reduce-overhead")`` does for one call, here for the whole chain).

:class:`GraphedSampler` fixes the batch shape, grid, sampler and its options. Inputs (initial
noise, conditioning, and for stochastic samplers the per-step noise ``[draws, *shape]``) are
copied into static buffers, the graph is replayed, and the output is cloned. The per-step
noise is drawn outside the graph, as one ``randn([draws, *shape])`` from the caller's generator:
the samples equal eager sampling given the same ``x`` and that ``noise`` block (up to
kernel-level float differences), though not eager sampling's own per-step draws.

On a device other than CUDA the same object runs the sampler eagerly with the same inputs:
code written against it runs everywhere. Capture needs ``torch.no_grad`` semantics (sampling
only) and the denoiser's parameters to stay the same tensors: optimiser steps and
``load_state_dict`` update them in place and are seen by the next replay; replacing a module
or parameter object needs a new ``GraphedSampler``.
"""
from __future__ import annotations


import torch
from torch import Tensor

from .denoiser import ClipX0, DenoiserBase
from .samplers import SAMPLERS, noise_draws, prepare_grid, prior, run_sampler


class GraphedSampler:
    """``sampler`` at batch shape ``shape`` on grid ``ts``, captured as a CUDA graph on first call.

    ``cond``: an example conditioning tensor (its shape, dtype and device are fixed; ``None`` for
    unconditional). Other keywords go to the sampler (``eta``, ``variance``, ...). Call with
    ``(cond, x=None, generator=None)``; ``x`` defaults to fresh prior noise.
    """

    def __init__(self, denoiser: DenoiserBase, shape, ts, sampler: str = "ddim", *, cond: Tensor | None = None,
                 clip_x0: float | None = None, device=None, dtype=torch.float32, warmup: int = 3, **kwargs):
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; valid: {', '.join(SAMPLERS)}")
        if warmup < 1:
            raise ValueError("warmup must be >= 1: the first eager runs build the grid and its device tensors, "
                             "which a capture cannot")
        if "callback" in kwargs or "noise" in kwargs:
            raise ValueError("a graphed sampler takes no callback or noise option: per-step noise is drawn for you")
        self.denoiser = ClipX0(denoiser, clip_x0) if clip_x0 is not None else denoiser
        self.shape, self.sampler, self.kwargs, self.warmup = tuple(shape), sampler, kwargs, warmup
        self.ts = torch.as_tensor(ts, dtype=torch.float64).cpu()
        if device is None:  # the denoiser's own device (a closed-form denoiser has no parameters: CPU)
            device = next(iter(denoiser.parameters()), torch.zeros(())).device
        self.device = torch.device(device)
        self.dtype = dtype
        self.draws = noise_draws(sampler, len(self.ts) - 1, **kwargs)
        self.cond_like = None if cond is None else (tuple(cond.shape), cond.dtype)
        if cond is not None and cond.shape[0] != self.shape[0]:
            raise ValueError(f"cond has batch size {cond.shape[0]} but shape has {self.shape[0]}")
        self.graphed = self.device.type == "cuda"
        self._graph, self._grid = None, None
        self._x = torch.empty(self.shape, device=self.device, dtype=dtype)
        self._noise = torch.empty((self.draws, *self.shape), device=self.device, dtype=dtype) if self.draws else None
        self._cond = None if cond is None else torch.empty_like(cond, device=self.device)
        self._out = None

    # ------------------------------------------------------------------------------ internals
    def _run(self) -> Tensor:
        kw = dict(self.kwargs)
        if self._noise is not None:
            kw["noise"] = self._noise
        return run_sampler(self.sampler, self.denoiser, self._x, self.ts, cond=self._cond, **kw)

    def _capture(self) -> None:
        # the graph reads the grid's time vectors and step tensors: hold them, so that the shared
        # grid cache (cleared when full) can never free memory a replay still reads
        self._grid = prepare_grid(self.denoiser, self._x, self.ts, self._cond)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.no_grad():  # warm-up: caches grids, autotunes kernels
            for _ in range(self.warmup):
                self._run()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.no_grad(), torch.cuda.graph(graph):
                self._out = self._run()
        except RuntimeError as e:
            raise RuntimeError(f"the {self.sampler!r} sampler could not be captured as a CUDA graph ({e}); "
                               "sample eagerly (diffpolicy.samplers.sample) instead") from e
        self._graph = graph

    def _check_cond(self, cond: Tensor | None) -> None:
        if (cond is None) != (self.cond_like is None):
            raise ValueError("this graphed sampler was built " + ("without" if cond is not None else "with")
                             + " conditioning; build another for the other case")
        if cond is not None and (tuple(cond.shape), cond.dtype) != self.cond_like:
            raise ValueError(f"cond must have shape {self.cond_like[0]} and dtype {self.cond_like[1]} "
                             f"(the shape it was built for), got {tuple(cond.shape)} {cond.dtype}")

    # ------------------------------------------------------------------------------ public
    def __call__(self, cond: Tensor | None = None, x: Tensor | None = None, *, generator=None) -> Tensor:
        self._check_cond(cond)
        with torch.no_grad():
            if x is None:
                x = prior(self.denoiser, self.shape, generator=generator, device=self.device, dtype=self.dtype)
            elif tuple(x.shape) != self.shape:
                raise ValueError(f"x must have shape {self.shape}, got {tuple(x.shape)}")
            self._x.copy_(x)
            if cond is not None:
                self._cond.copy_(cond)
            if self._noise is not None:
                self._noise.copy_(torch.randn(self._noise.shape, generator=generator, device=self.device,
                                              dtype=self.dtype))
            if not self.graphed:
                return self._run()
            if self._graph is None:
                self._capture()
            self._graph.replay()
            return self._out.clone()
