"""How entclip quiets the libraries it drives (transformers, huggingface_hub, datasets)."""

from __future__ import annotations


def quiet_libraries() -> None:
    """Our console reports progress; the libraries' own bars and notices would interleave with it."""
    import huggingface_hub
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.logging.set_verbosity_error()  # offline retries are reported by our one line
    try:
        import datasets

        datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its failures reach us as exceptions
        datasets.disable_progress_bars()
    except ImportError:
        pass
