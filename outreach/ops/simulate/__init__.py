"""Run the real campaigns and policies over a synthetic cohort on a virtual clock (``outreach campaigns simulate``).

HR changes a cadence, a cap or a quiet-hours window and wants to know what it does to candidates before it ships.
:func:`~outreach.ops.simulate.run.simulate` answers with a year (or any span) of recruiting compressed into seconds:

* a fresh in-memory SQLite database with the service's own tables;
* the campaigns from the campaigns folder (all of them, or only the ones named; a campaign named explicitly runs
  even when its file says ``enabled: false``, so a draft can be tried before it goes live) and the policy file
  beside them, unchanged except for ``rate_limits``: provider pacing is about wall-clock throughput and means
  nothing on a virtual clock;
* a synthetic cohort drawn from ``seed``: names, emails and valid phone numbers in each candidate's country, mostly
  Shanghai with candidates elsewhere in Asia, in Europe and in the Americas, en and zh-CN, tags, sources, nurture
  consent, and a life story (an application at any hour of any day, replies, an out-of-office auto-reply now and
  then, offers accepted with the onboarding data or declined with a reason, final-interview rejections, hires,
  jobs reopening for the talent pool);
* the service itself: every story event goes through :func:`outreach.pipeline.enrollment.record_event` (replies through
  :func:`~outreach.pipeline.enrollment.record_reply`, auto-replies through
  :func:`~outreach.pipeline.enrollment.pause_for_out_of_office`); at every instant the scheduler runs the passes of
  :meth:`Scheduler.tick <outreach.pipeline.scheduler.Scheduler.tick>` that move messages (cron firings, due steps, the
  sweeper releasing held rows; passes with nothing due are not run, and passes that only raise HR alerts are left
  out), and everything they queue goes through :func:`outreach.pipeline.delivery.deliver` with the rules at schedule and
  send time, template rendering included. Only the providers are fakes that record the call; nothing leaves the
  process.

The clock (:func:`outreach.core.clock.set_clock`) jumps from one interesting instant to the next (the next story
event, the earliest due enrollment step, the earliest held message, the next cron firing) instead of stepping
through every minute. Candidates never affect one another (caps, windows, replies and enrollments are all per
candidate), so the cohort is cut into :data:`~outreach.ops.simulate.run.SHARDS` parts, each with its own database, run
side by side in worker processes when there are cores for them.

The run is deterministic for a seed, whatever the number of processes: the cohort comes from
``random.Random(seed)``, and so do the outbox ids the scheduler mints (their hash places a deferred message inside
the quiet-hours ``spread``).

The modules, in the order a run uses them:

* :mod:`~outreach.ops.simulate.cohort`: who the candidates are and what happens to them;
* :mod:`~outreach.ops.simulate.world`: the service with fake providers on one shard's database, and the loop that
  drives its virtual clock;
* :mod:`~outreach.ops.simulate.measure`: what the run counts and re-checks (:mod:`its docstring
  <outreach.ops.simulate.measure>` says what each figure means);
* :mod:`~outreach.ops.simulate.report`: the report, as data and as a table;
* :mod:`~outreach.ops.simulate.run`: the entry point, :func:`~outreach.ops.simulate.run.simulate`, and the shards.
"""
