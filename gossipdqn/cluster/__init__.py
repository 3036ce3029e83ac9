"""Starting, watching and stopping processes on one machine or many."""
