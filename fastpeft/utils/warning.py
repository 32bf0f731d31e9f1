"""PeftWarning: the category of the warnings fastpeft emits where peft emits its own PeftWarning.

A UserWarning subclass, as in peft (``peft.utils.warning.PeftWarning``), so ``warnings.filterwarnings(...,
category=UserWarning)`` still covers it and ``category=fastpeft.PeftWarning`` selects only these.
"""

__all__ = ["PeftWarning"]


class PeftWarning(UserWarning):
    """Base class of fastpeft's own warnings (peft's name)."""
