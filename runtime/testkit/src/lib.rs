//! The test harness shared by Outpost's test suites.
