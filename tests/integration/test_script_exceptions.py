"""An exception class defined in the master's script comes back from a worker as itself."""

from __future__ import annotations

import pytest

import fastdist as fd

pytestmark = pytest.mark.timeout(60)

# What a script run as `python script.py` defines: classes and functions of
# __main__, which travel to workers by value.
_script: dict[str, object] = {"__name__": "__main__"}
exec(
    "class ScriptError(ValueError):\n"
    "    pass\n"
    "def fail(msg):\n"
    "    raise ScriptError(msg)\n",
    _script,
)
ScriptError: type[ValueError] = _script["ScriptError"]  # type: ignore[assignment]
fail = _script["fail"]


def test_remote_exception_cause_is_the_scripts_class(two_workers):
    with pytest.raises(fd.RemoteException) as info:
        fd.remotecall_fetch(fail, two_workers[0], "from the script")
    assert type(info.value.__cause__) is ScriptError
    assert type(info.value.captured.ex) is ScriptError
    assert str(info.value.__cause__) == "from the script"


def test_pmap_on_error_and_retry_check_see_the_scripts_class(two_workers):
    seen: list[type] = []

    def on_error(exc):
        seen.append(type(exc))
        return "handled"

    assert fd.pmap(fail, ["a", "b"], on_error=on_error) == ["handled", "handled"]
    assert seen == [ScriptError, ScriptError]
