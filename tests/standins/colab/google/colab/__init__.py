"""Stand-in for Colab's ``google.colab`` package (it exists only on Colab); see tests/standins/README.md."""
