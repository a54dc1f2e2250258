"""The blueapi side: ``AnalysisTrigger`` (a document callback) and ``uses_analyses`` (a plan
decorator).  Light to import — blueapi loads it in its own process."""

from .callback import AnalysisTrigger, TriggerSettings, subscribe_for

__all__ = ["AnalysisTrigger", "TriggerSettings", "subscribe_for", "uses_analyses"]


def __getattr__(name):
    if name == "uses_analyses":  # imports bluesky; blueapi has it anyway
        from .plans import uses_analyses

        return uses_analyses
    raise AttributeError(name)
