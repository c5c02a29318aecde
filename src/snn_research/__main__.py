from snn_research.cli import app

app(prog_name="snn-research")
