"""The Dramatiq actors (:mod:`workers.actors`, :mod:`workers.batch`); a worker process starts from
:mod:`workers.main`, which sets up the broker and the runtime before declaring them. ``outreach up`` declares them on
its in-process broker instead.
"""
