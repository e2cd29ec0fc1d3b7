// Runs one prepared statement ten times with the PostgreSQL JDBC driver and prints every
// value it reads, one row per line, as "column=Class:value;". The driver switches the
// statement to a server-side prepared statement with binary transfer on its sixth
// execution (prepareThreshold=5, the default); the test compares the lines read through
// the gateway with the same program run against the server directly.
import java.sql.*;
import java.util.*;

public class Probe {
    static String show(Object value) throws SQLException {
        if (value == null) return "null";
        if (value instanceof byte[] bytes) {
            StringBuilder hex = new StringBuilder();
            for (byte b : bytes) hex.append(String.format("%02x", b));
            return "bytes:" + hex;
        }
        if (value instanceof java.sql.Array array) return "array:" + Arrays.deepToString((Object[]) array.getArray());
        if (value instanceof SQLXML xml) return "xml:" + xml.getString();
        return value.getClass().getSimpleName() + ":" + value;
    }

    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        props.setProperty("sslmode", "disable");
        try (Connection c = DriverManager.getConnection(args[0], props);
             PreparedStatement ps = c.prepareStatement(args[3])) {
            for (int run = 0; run < 10; run++) {
                ps.setInt(1, run % 2 + 1);
                try (ResultSet rs = ps.executeQuery()) {
                    ResultSetMetaData md = rs.getMetaData();
                    while (rs.next()) {
                        StringBuilder line = new StringBuilder(run + ":");
                        for (int i = 1; i <= md.getColumnCount(); i++) {
                            line.append(md.getColumnName(i)).append('=').append(show(rs.getObject(i))).append(';');
                        }
                        System.out.println(line);
                    }
                }
            }
        }
    }
}
