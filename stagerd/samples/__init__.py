"""Sample programs shipped with stagerd: a real processor and a batch generator.

* ``python -m stagerd.samples.wavinfo``: a processor reading every WAV header of a batch
  (oneshot, or ``--persistent`` speaking the JSON-lines protocol on stdin/stdout).
* ``python -m stagerd.samples.makebatch OUT.tar --files N``: a deterministic batch archive
  of small valid WAV files, for the demo, tests and benchmarks.
"""
