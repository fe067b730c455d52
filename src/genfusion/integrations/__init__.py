"""The outside programs the stages drive: Ultralytics, Label Studio and FiftyOne, each set up
here once (offline, on loopback, in the project's folders)."""
