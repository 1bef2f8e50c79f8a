"""The warnings subspace_ext gives: one category, so that a caller (or the CLI, which prints them as one line)
tells them from another library's, whichever frame those point at."""
import warnings


class SubspaceExtWarning(UserWarning):
    """Every warning of subspace_ext (a UserWarning). ``warnings.filterwarnings("ignore",
    category=subspace_ext.SubspaceExtWarning)`` silences them and only them."""


def warn(message: str, stacklevel: int = 1) -> None:
    """``warnings.warn(message, SubspaceExtWarning, stacklevel)``, the level counted from the caller."""
    warnings.warn(message, SubspaceExtWarning, stacklevel=stacklevel + 1)
