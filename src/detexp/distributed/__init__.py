"""Ray: start-up and resource checks on the driver, the Ray Train trainer and its controller-side
callbacks, the Train worker loop (the only code that calls ``ray.train`` in a worker), Ray
Data batch inference and the Ray Serve endpoint.

May import checkpoint, engine, evaluation, modeling, tracking, data, config and errors;
never a command. ``controller`` is unpickled in Ray's controller processes, so it (and
this file) import no torch; nor do ``trainer`` and ``cluster``, which the driver of a run
(or a Tune trial's actor) uses: torch is imported where a model runs.
"""
