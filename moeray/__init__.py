"""moeray: Ray-native expert-parallel MoE serving that keeps expert placement balanced while it serves.

`from moeray import LLM, SamplingParams` (imported on first use, so `import moeray` stays cheap).
"""

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from moeray.llm import LLM

        return LLM
    if name == "SamplingParams":
        from moeray.generation.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'moeray' has no attribute {name!r}")
