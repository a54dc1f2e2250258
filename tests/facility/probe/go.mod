module visitflow.test/probe

go 1.22
