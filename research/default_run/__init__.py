"""The default run's study and diagnostics: scripts run with ``python -m research.default_run.<script>``
from the repository root; see README.md here."""
