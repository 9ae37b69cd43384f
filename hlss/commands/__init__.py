"""The ``hlss`` subcommands, one module per group; each module's ``add_parsers(sub)`` adds its
commands, each with ``func``: the function that runs it (``args -> exit status``, :mod:`hlss.exit`).

- :mod:`.cohort`: ``demo-cohort``, ``tile``, ``info``, ``verify``;
- :mod:`.outputs`: ``qc``, ``report``, ``export-mil``, ``export-geojson``;
- :mod:`.model`: ``train``, ``extract``, ``knn``, ``explain``;
- :mod:`.flows`: ``serve``, ``deploy``, ``run``;
- :mod:`.encoders`: ``encoders``.
"""

from . import cohort, encoders, flows, model, outputs

GROUPS = (cohort, model, encoders, flows, outputs)
