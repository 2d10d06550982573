"""`norga sweep`: a grid of trials (methods x seeds x settings x presets), run on Ray, aggregated with spread.

`spec` expands a request into named trials, `directory` owns the sweep directory and its manifest,
`executor` runs the trials as Ray tasks, `aggregate` turns finished runs into tables, `plot` draws them.
"""
