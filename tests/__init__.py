"""Test suite. A regular package on purpose: torch-fidelity installs a top-level `tests`
package into site-packages, which would otherwise shadow this directory (and break the
`tests.fixtures.*` pytest plugins)."""
