"""Which modules behave differently in training and in eval mode.

Captured graphs and lane clones are made once; a module whose forward reads `self.training`
(dropout, batch norm, Hugging Face attention with its dropout) must then be seen in the mode the
user has it in now. Decided per class from its source (cached); a class without source counts
as mode-dependent, never the other way round.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

from torch import nn

_ALWAYS = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._NormBase, nn.modules.rnn.RNNBase)


@functools.lru_cache(maxsize=None)
def _class_reads_training(cls: type) -> bool:
    if issubclass(cls, _ALWAYS):
        return True
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            continue
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):  # no source (a class typed into a REPL, a C extension): assume it does
            return True
        if "training" in source:
            return True
    return False


def reads_training(module: nn.Module) -> bool:
    """Does `module`'s own code (its class or a base class, not its children) read the
    train/eval flag?

    >>> reads_training(nn.Dropout(0.1)), reads_training(nn.Linear(2, 2))
    (True, False)
    """
    return _class_reads_training(type(module))


@contextlib.contextmanager
def eval_mode(modules):
    """Every module in `modules` in eval mode for the block, each flag restored after (even on an
    error). Checks that compare two runs use it: dropout draws differ between any two runs, so
    only the deterministic computation can be compared.

    >>> drop = nn.Dropout(0.5)
    >>> with eval_mode([drop]):
    ...     drop.training
    False
    >>> drop.training
    True
    """
    modules = list(dict.fromkeys(modules))
    flags = [m.training for m in modules]
    try:
        for m in modules:
            m.training = False
        yield
    finally:
        for m, f in zip(modules, flags):
            m.training = f
