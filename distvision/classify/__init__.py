"""`distvision classify`: classify a large image collection with a trained checkpoint on many workers.

No communication is needed between workers but for handing out work: the input is cut into fixed
chunks of files, workers claim chunks from a counter in the rendezvous store (so a slow worker
simply claims fewer), and each chunk's predictions are written atomically as a part file. A rerun
skips the chunks that have parts; at the end rank 0 merges the parts into the outputs.

  settings.py  the command's settings (one dataclass) and where its outputs go
  inputs.py    what --input holds (folder tree, list file, prepared folder) and reading its images
  work.py      the job's plan, its chunks, claiming them through the store, part files
  report.py    merging parts into predictions.csv, errors.csv, summary.json and the accuracy report
  worker.py    the worker, top to bottom, and the command that launches workers
"""
