"""Triton kernels of sharpopt's ``triton`` backend (installed as ``sharpopt.kernels``).

One module per pass family, each read top-down (constants, ``@triton.jit`` kernels,
launcher): ``norm`` (sumsq with the gradient-centralisation row means, dot), ``perturb``,
``restore_update`` (restore + SGD / Adam / AdamW), ``msam`` (MSAM's move back +
update + momentum norm), ``lincomb`` (combines and the exact
restore copy); ``tables`` holds the multi-tensor launch tables they share, and
``elementwise`` the per-element math under the names of ``csrc/sharpopt_math.h``.

Import them as ``sharpopt.kernels.<module>``; importing compiles nothing (Triton compiles
a kernel on its first launch for each set of compile-time switches).
"""
