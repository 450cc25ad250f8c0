"""CUDA C++ extension backend (placeholder until the extension lands: it reports why it cannot run)."""


def load_error() -> str | None:
    return "the CUDA extension is not part of this build yet"
