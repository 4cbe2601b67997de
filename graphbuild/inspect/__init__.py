"""Looking at a run before training against it.

  neighbors.py  the nearest nodes of a node, or of any text (embedded with the run's model)
  stats.py      duplicates, similarity percentiles, degrees and hubness, target entropy
  validate.py   every file of a run checked; one line per problem
  report.py     one self-contained HTML page with plots
"""
