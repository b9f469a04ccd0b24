"""`distvision bench`: a suite of training problems, each trained at several worker counts and sync modes."""
