"""Errors a user can cause (bad config, bad data row, unreachable judge).

They carry one line that names the file, row or setting; the CLI prints that line and exits
non-zero, without a traceback.
"""


class TraceError(Exception):
    """A problem in the user's input or environment, reported as one clear line."""


class DataError(TraceError):
    """A data file or row that cannot be used."""


class ConfigError(TraceError):
    """A setting that is missing, misspelt or of the wrong type."""


def describe_validation_errors(errors, where: str, drop: tuple[str, ...] = ()) -> str:
    """One line for pydantic validation errors, each naming its setting (``where.key.sub``).

    ``drop`` lists location parts that are not setting names (e.g. the tags of a union).
    """
    parts = []
    for error in errors:
        loc = [str(p) for p in error["loc"] if p not in drop]
        name = ".".join([where, *loc]) if where else ".".join(loc)
        if not name:  # a check across sections names its settings itself
            parts.append(str(error["msg"]).removeprefix("Value error, "))
        elif error["type"] == "extra_forbidden":
            parts.append(f"unknown setting '{name}' (check its spelling)")
        elif error["type"] == "missing":
            parts.append(f"setting '{name}' is required")
        else:
            parts.append(f"setting '{name}': {error['msg']}")
    return "; ".join(parts)
